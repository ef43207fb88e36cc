"""Widget panels: ``panel()`` tunes the session's provider settings, ``studio()`` generates and browses.

Both wrap plain ``ipywidgets`` (imported here, and this module is only imported on first use, so
``import nbimagine`` stays fast) and work without a browser: every control is a real widget whose
value can be set and whose buttons can be ``click()``-ed, which is what the model tests do.

Binding: the panels read and write the process-wide :class:`~nbimagine._session.ImagineSession`.
A valid change in a panel is applied with ``session.use(...)`` at once, so it is the default of the
next ``%%imagine``; a change made elsewhere (``%imagine use ...``, ``%config``, another panel) is
observed and shown. A value that would be invalid is kept in its control, flagged inline with the
reason, and not applied; the rest of the settings still are.

Threading: a generation runs on the ``_sync`` background loop and reports events on that loop's
thread. The studio never touches a widget from there: every update is handed to the thread that
created the studio (the kernel's main thread, whose asyncio loop also dispatches widget messages)
with ``loop.call_soon_threadsafe``. Without a running loop (plain Python, tests) updates run on the
calling thread under a lock.
"""

from __future__ import annotations

import asyncio
import errno
import html
import io
import os
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import ipywidgets as w
import traitlets as t

from ._images import human_bytes, sniff_media_type
from ._options import EVERY_PROVIDER, IMAGE_CONFIG, IMAGE_TOOL, Option, option, options_for
from ._options import SETTINGS as TABLE
from ._painter import MaskPainter
from ._session import DEFAULT_MODELS, KEY_ENV, ImagineSession, foundry_credential_sources, get_session
from .config import GEMINI_NEWEST_ONLY_RATIOS, GEMINI_NEWEST_ONLY_SIZES
from .errors import ConfigError, ContentPolicyError, ImagineError, InputError, ProviderError, redact
from .events import _media_type_for_suffix as media_type_for_suffix
from .tools import COMPRESSIBLE_FORMATS

if TYPE_CHECKING:
    from ._generate import Generation
    from ._history import History, HistoryEntry
    from .events import BinaryResult

__all__ = ["PROVIDER_LABELS", "STATIC", "ProviderPanel", "Studio", "StudioView", "panel", "plain_error", "studio"]

PROVIDER_LABELS = {
    "openai": "OpenAI",
    "openai-images": "OpenAI Images API",
    "azure": "Azure OpenAI",
    "azure-images": "Azure OpenAI Images API",
    "foundry": "Microsoft Foundry agent",
    "gemini": "Gemini",
    "vertex": "Vertex AI",
}
DEFAULT = ""  # the "provider default" choice of a dropdown (the session's None)
CUSTOM = "custom"  # the size dropdown's "custom WxH" choice
THUMB_SIDE = 192
PREVIEW_SIDE = 768
STATIC = Path(__file__).parent / "static"  # the studio's ES module and CSS, shipped in the package

def _choices(values: Sequence[str], default_label: str = "default") -> list[tuple[str, str]]:
    return [(default_label, DEFAULT), *((v, v) for v in values)]


def _wide() -> w.Layout:  # one Layout per control: hiding one must not hide the others
    return w.Layout(width="360px")


def _opt(value: str) -> str | None:
    return value or None


def _show(widget: w.Widget, visible: bool) -> None:
    widget.layout.display = None if visible else "none"


def _error_html(message: str) -> str:
    if not message:
        return ""
    return (f'<span class="nbi-error-text" style="color:#b00020">⚠ {html.escape(message)}</span>')


def _note_html(message: str) -> str:
    if not message:
        return ""
    return f'<span class="nbi-note-text" style="color:#8a6d00">ⓘ {html.escape(message)}</span>'


class _UIThread:
    """Runs widget updates on the thread that made the panel.

    In a kernel that is the main thread, whose asyncio loop also dispatches widget messages: a call
    from any other thread (the generation loop, a ticker) is queued there with
    ``call_soon_threadsafe``. Without a running loop (plain Python, tests) it runs on the calling
    thread. Either way it runs under ``lock``, and an exception goes to ``on_error`` instead of
    killing the caller's thread.
    """

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self.lock = threading.RLock()
        self.on_error = on_error
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self.thread = threading.get_ident()

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self.loop
        if loop is not None and threading.get_ident() != self.thread and loop.is_running() and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._run, fn, *args)
                return
            except RuntimeError:  # the loop closed meanwhile: run here
                pass
        self._run(fn, *args)

    def _run(self, fn: Callable[..., None], *args: Any) -> None:
        with self.lock:
            try:
                fn(*args)
            except Exception as exc:  # a display problem must never leave a panel stuck
                self.on_error(exc)


# ------------------------------------------------------------------------------------------------
# Provider panel
# ------------------------------------------------------------------------------------------------


class ProviderPanel:
    """Provider, model and image options of the session, with per-provider controls.

    The controls are made from the option table (:data:`nbimagine._options.SETTINGS`): one per row,
    with the row's allowed values and its help as tooltip. ``controls[name]`` is the control of option
    ``name``, also an attribute (``quality``, ``size``, ``aspect_ratio``...); besides them:
    ``provider``, ``emulator``, ``custom_size`` (the size's WxH field), ``compression_on``, ``compression``
    (= ``controls["output_compression"]``), ``modalities`` (a checkbox per response modality),
    ``errors[name]`` (the inline message under each option, and ``"apply"``), ``keys`` (key status),
    ``in_effect`` (what the next ``%%imagine`` sends) and ``inactive`` (values kept for other providers).

    The panel never shows a value that is not in effect: a choice the session refuses (a transparent
    JPEG, no response modality) is put back with the reason beside it; a custom size that is not valid
    yet is explained as "not applied" while it is typed, and the size in effect is named.
    """

    def __init__(self, session: ImagineSession | None = None) -> None:
        self.session = session or get_session()
        self._ui = _UIThread(lambda exc: setattr(self.errors["apply"], "value", _error_html(str(exc))))
        self._applying = False  # True while the panel itself writes the session
        self._loading = False  # True while the panel loads the session into its controls
        self._style = {"description_width": "125px"}  # "Image deployment" whole at 1024 px

        self.provider = w.Dropdown(description="Provider", options=self._provider_options(), style=self._style,
                                   layout=_wide())
        self.emulator = w.Checkbox(description="Offline emulator (no key needed)", indent=False)
        self.keys = w.HTML()
        self.refresh_keys = w.Button(description="Check keys", icon="refresh", tooltip="Read the environment again",
                                     layout=w.Layout(width="120px", min_width="120px"))
        self.in_effect = w.HTML()
        self.inactive = w.HTML()
        self._snapshot_id = secrets.token_hex(8)
        self._snapshot: Any = None  # the display handle of the static copy, once displayed
        self.errors: dict[str, w.HTML] = {name: w.HTML() for name in (*(opt.name for opt in TABLE), "apply")}
        for name, box in self.errors.items():
            box.add_class(f"nbi-error-{name}")

        self.custom_size = w.Text(description="Custom size", placeholder="e.g. 2048x1152", style=self._style,
                                  layout=_wide())  # continuous: its message follows the typing
        self.compression_on = w.Checkbox(description="Set compression", indent=False,
                                         layout=w.Layout(width="140px"))
        self.modalities = {m: w.Checkbox(description=m, indent=False, layout=w.Layout(width="90px"))
                           for m in option("response_modalities").choices}
        self.controls: dict[str, w.ValueWidget] = {opt.name: self._make_control(opt) for opt in TABLE}
        for name, control in self.controls.items():
            setattr(self, name, control)
            control.add_class(f"nbi-{name.replace('_', '-')}")
        self.compression = self.controls["output_compression"]

        rows: dict[tuple[str, ...], list[w.Widget]] = {}
        for opt in TABLE:
            rows.setdefault(opt.families, []).extend([self._row(opt), self.errors[opt.name]])
        # One box per provider family; options every provider takes sit outside them.
        self.family_boxes = {families: w.VBox(children) for families, children in rows.items() if families}
        self.openai_box = self.family_boxes[IMAGE_TOOL]
        self.foundry_box = self.family_boxes[("foundry",)]
        self.gemini_box = self.family_boxes[IMAGE_CONFIG]
        common = rows.get(EVERY_PROVIDER, [])
        self.widget = w.VBox([
            w.HTML("<b>nbimagine provider settings</b>"),
            w.HBox([self.provider, self.emulator]),
            *common[:2],  # the model first, the rest of the common options after the provider's own
            *self.family_boxes.values(),
            *common[2:],
            self.errors["apply"],
            self.in_effect, self.inactive,
            # Wraps between the providers' key states (each one unbroken), never inside one or the button.
            w.HBox([self.keys, self.refresh_keys], layout=w.Layout(flex_flow="row wrap", align_items="center")),
            _live_style(self._snapshot_id),
        ])
        self.widget.add_class("nbi-panel")
        for name in ("provider", "emulator", "custom_size", "compression_on", "in_effect", "inactive", "refresh_keys"):
            getattr(self, name).add_class(f"nbi-{name.replace('_', '-')}")
        for name, box in self.modalities.items():
            box.add_class(f"nbi-modality-{name.lower()}")

        self._load()
        for control in self._inputs():
            control.observe(self._on_control, names="value")
        self.refresh_keys.on_click(lambda _: self._render_keys())
        self.session.observe(self._on_session, names=list(self.session.trait_names()))

    # --- building ------------------------------------------------------------------------------------

    def _make_control(self, opt: Option) -> w.ValueWidget:
        common: dict[str, Any] = {"description": opt.title, "style": self._style, "layout": _wide(),
                                  "tooltip": opt.help_text()}
        if opt.kind is bool:
            return w.Checkbox(indent=False, **common)
        if opt.name == "size":
            return w.Dropdown(options=[*_choices(opt.choices), ("custom WxH", CUSTOM)], **common)
        if opt.kind is list:
            return w.HBox(list(self.modalities.values()))  # read and written through the checkboxes
        if opt.kind is int and opt.default is not None:
            low, high = opt.bounds or (0, 0)
            return w.IntSlider(min=low, max=high, value=opt.default, continuous_update=False, **common)
        if opt.kind is int and opt.name == "output_compression":
            low, high = opt.bounds or (0, 100)
            common["layout"] = w.Layout(width="360px")
            return w.IntSlider(min=low, max=high, value=80, continuous_update=False, **common)
        if opt.kind is int and opt.bounds and opt.bounds[1] - opt.bounds[0] > 100:  # typed: too many to list
            return w.Text(continuous_update=False, placeholder=opt.example or opt.unset, **common)
        if opt.kind is int:
            low, high = opt.bounds or (0, 0)
            return w.Dropdown(options=[(opt.unset, DEFAULT), *((str(i), i) for i in range(low, high + 1))], **common)
        if opt.choices:
            return w.Dropdown(options=_choices(opt.choices), **common)
        return w.Text(continuous_update=False, placeholder=opt.example, **common)

    def _row(self, opt: Option) -> w.Widget:
        control = self.controls[opt.name]
        if opt.name == "size":
            return w.HBox([control, self.custom_size])
        if opt.name == "output_compression":
            return w.HBox([control, self.compression_on])
        if opt.kind is list:
            return w.HBox([w.Label(opt.title, layout=w.Layout(width="150px")), control])
        return control

    def _inputs(self) -> list[w.ValueWidget]:
        controls = [c for name, c in self.controls.items() if option(name).kind is not list]
        return [self.provider, self.emulator, *controls, self.custom_size, self.compression_on,
                *self.modalities.values()]

    # --- the panel as a displayable object ---------------------------------------------------------

    def _ipython_display_(self) -> None:
        self._snapshot = _display_live(self.widget, repr(self), self.snapshot())

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        return bundle

    def snapshot(self) -> dict[str, Any]:
        """The static copy shown after the live panel: the settings in effect (see :func:`_display_live`)."""
        kept = self.session.inactive_options() if self._known() else {}
        text = f"nbimagine provider settings: {self.session.summary()}"
        if kept:
            text += " (kept, not in effect: " + ", ".join(f"{n}={option(n).show(v)}" for n, v in kept.items()) + ")"
        text += ". A saved copy: run the cell to change them."
        return {"text/plain": text, "text/html": _static_copy(self._snapshot_id, html.escape(text))}

    def close(self) -> None:
        """Stop following the session and close the widgets."""
        self.session.unobserve(self._on_session, names=list(self.session.trait_names()))
        _close_tree(self.widget)

    def __repr__(self) -> str:
        return f"<nbimagine settings panel: {self.session.summary()}>"

    # --- reading the controls ----------------------------------------------------------------------

    def _provider_options(self) -> list[tuple[str, str]]:
        out = []
        names = list(self.session.providers)
        if self.session.provider not in names:  # set behind use()'s back; shown so that it can be changed
            names.append(self.session.provider)
        for name in names:
            if name in PROVIDER_LABELS:
                out.append((PROVIDER_LABELS[name], name))
            else:
                out.append((f"{name} ({PROVIDER_LABELS.get(self._kind(name), '?')})", name))
        return out

    @property
    def kind(self) -> str:
        """The provider family of the chosen provider ("openai", "azure", "gemini", "vertex")."""
        return self._kind(self.provider.value)

    def _kind(self, name: str) -> str:
        try:
            return self.session.kind(name)
        except ConfigError:  # a name the session no longer knows: its error is shown by apply()
            return "openai"

    def _model_for(self, name: str, model: str | None) -> str:
        try:
            return self.session.effective_model(name, model)
        except ConfigError:
            return model or ""

    def _read(self, name: str) -> Any:
        """The session value a control asks for (valid or not)."""
        control = self.controls[name]
        if name == "size":
            return (self.custom_size.value.strip() or None) if control.value == CUSTOM else _opt(control.value)
        if name == "output_compression":
            on = self.controls["output_format"].value in COMPRESSIBLE_FORMATS and self.compression_on.value
            return control.value if on else None
        if name == "response_modalities":
            return [m for m, box in self.modalities.items() if box.value]
        if isinstance(control, w.Text):
            text = control.value.strip() or None
            # A typed number (--rate-limit) is an int for validation; anything else is refused there, in words.
            return int(text) if text and option(name).kind is int and text.isdigit() else text
        if isinstance(control, (w.IntSlider, w.Checkbox)):
            return control.value
        return None if control.value == DEFAULT else control.value

    def _write(self, name: str, value: Any) -> None:
        """Show a session value in its control (and its companions)."""
        control = self.controls[name]
        if name == "size":
            if value is None or value in option("size").choices:
                control.value = value or DEFAULT
                self.custom_size.value = ""
            else:
                control.value = CUSTOM
                self.custom_size.value = value
        elif name == "output_compression":
            self.compression_on.value = value is not None
            if value is not None:
                control.value = value
        elif name == "response_modalities":
            chosen = [str(m).upper() for m in (value or [])]
            for modality, box in self.modalities.items():
                box.value = modality in chosen
        elif isinstance(control, w.Text):
            control.value = "" if value is None else str(value)
        elif isinstance(control, w.Checkbox):
            control.value = bool(value)
        elif isinstance(control, w.IntSlider):
            control.value = value if value is not None else option(name).default
        else:
            known = [v for _, v in control.options]
            control.value = value if value in known else DEFAULT

    def wanted(self) -> dict[str, Any]:
        """What the controls ask for, valid or not: ``provider``, ``emulator`` and every option the chosen
        provider takes (the hidden controls of other providers hold the session's kept values)."""
        out: dict[str, Any] = {"provider": self.provider.value, "emulator": self.emulator.value}
        out.update({opt.name: self._read(opt.name) for opt in options_for(self.kind)})
        return out

    def problems(self, wanted: dict[str, Any] | None = None) -> dict[str, str]:
        """Why wanted values cannot be applied: option name -> reason (empty when all can be)."""
        wanted = wanted or self.wanted()
        found: dict[str, str] = {}
        if "size" in wanted and self.size.value == CUSTOM:
            text = self.custom_size.value.strip()
            try:
                option("size").validate(text or "")
            except ConfigError as exc:
                reason = (re.sub(r"^--size: size '.*?' is not allowed: ", "", str(exc)) if text
                          else "type a size such as 2048x1152")
                found["size"] = f"{text or 'The custom size'} is not applied yet: {reason}"
        for name in self._typed(wanted):  # free text being typed (an endpoint, an agent name...)
            opt, text = option(name), self.controls[name].value.strip()
            try:
                opt.validate(wanted[name])  # as _read gives it: a typed number is an int
            except ConfigError as exc:
                reason = re.sub(rf"^{re.escape(opt.flag)}:?\s*", "", str(exc))
                found[name] = f"{text} is not applied yet: {reason}"
        if wanted.get("background") == "transparent" and wanted.get("output_format") == "jpeg":
            found["output_format"] = "JPEG has no transparency: choose png or webp, or a background other than " \
                                     "transparent first"
        if "response_modalities" in wanted and not wanted["response_modalities"]:
            found["response_modalities"] = "Choose at least one response modality (IMAGE to get images)"
        return found

    def _typed(self, names: Any) -> list[str]:
        """Which of ``names`` are typed as free text (their text stays while it is not valid yet)."""
        return [name for name in names if name in self.controls and isinstance(self.controls[name], w.Text)]

    def notes(self, wanted: dict[str, Any] | None = None) -> dict[str, str]:
        """Warnings that do not block the change (shown inline)."""
        wanted = wanted or self.wanted()
        found: dict[str, str] = {}
        model = self._model_for(wanted["provider"], wanted.get("model"))
        newest = "3.1-flash-image" in model
        ratio, tier = wanted.get("aspect_ratio"), wanted.get("image_size")
        if not newest and (ratio in GEMINI_NEWEST_ONLY_RATIOS or tier in GEMINI_NEWEST_ONLY_SIZES):
            found["aspect_ratio"] = (f"{ratio or ''} {tier or ''}".strip()
                                     + f" is documented for Gemini 3.1 Flash Image only; {model} may refuse it.")
        modalities = wanted.get("response_modalities")
        if modalities and "IMAGE" not in modalities:
            found["response_modalities"] = "Without IMAGE the model answers in text only."
        if "output_compression" in wanted and self.compression_on.value and \
                self.output_format.value not in COMPRESSIBLE_FORMATS:
            found["output_compression"] = "Compression applies to jpeg and webp only, so it is not sent."
        return found

    # --- writing the session -----------------------------------------------------------------------

    def _on_control(self, change: dict[str, Any]) -> None:
        if self._loading:
            return
        owner = change["owner"]
        if owner is self.provider and change["old"] != change["new"]:
            # A model name belongs to its provider: switching goes back to the new provider's default.
            with self._hold():
                self.model.value = ""
        self._update_rules()
        self.apply(changed=self._option_of(owner))

    def _option_of(self, control: w.Widget) -> str | None:
        if control is self.custom_size:
            return "size"
        if control is self.compression_on:
            return "output_compression"
        if control in self.modalities.values():
            return "response_modalities"
        return next((name for name, c in self.controls.items() if c is control), None)

    def apply(self, changed: str | None = None) -> bool:
        """Write the wanted values to the session; True if all were applied.

        A value that cannot be applied is not kept in its control: the control shows the session's
        value again and the reason is shown beside it. Only text being typed (a custom size, an endpoint,
        an agent name...) stays, marked "not applied yet" with the value in effect.
        """
        wanted = self.wanted()
        problems = self.problems(wanted)
        options = dict(wanted)
        provider = options.pop("provider")
        for name in problems:
            options.pop(name, None)
            if name == "output_format" and changed in ("background", "output_format"):
                options.pop("background", None)
        self._applying = True
        try:
            self.session.use(provider, **options)
        except ConfigError as exc:
            problems["apply"] = str(exc)
        finally:
            self._applying = False
        typed = ["size", *self._typed(problems)]
        blocked = [name for name in problems if name not in typed] + (["apply"] if "apply" in problems else [])
        if blocked:
            # Put back what the session has, so that nothing on display is out of effect (text being typed
            # stays, marked "not applied yet").
            texts = {name: self.controls[name].value for name in self._typed(problems)}
            self._load(messages=False)
            with self._hold():
                for name, text in texts.items():
                    self.controls[name].value = text
            if changed in ("background", "output_format") and "output_format" in problems:
                shown = self.session.background if changed == "background" else self.session.output_format
                problems["output_format"] += f"; {changed.replace('_', ' ')} stays {shown or 'default'}"
        if "size" in problems:
            problems["size"] += f"; the size in effect is {self.session.size or 'the default'}"
        for name in self._typed(problems):
            problems[name] += f"; in effect: {option(name).show(getattr(self.session, name))}"
        self._show_messages(problems, self.notes())
        self._render_state()
        return not problems

    def _show_messages(self, problems: dict[str, str], notes: dict[str, str]) -> None:
        for name, box in self.errors.items():
            if name in problems:
                box.value = _error_html(problems[name])
            else:
                box.value = _note_html(notes.get(name, ""))

    # --- reading the session -----------------------------------------------------------------------

    def _hold(self) -> _Flag:
        return _Flag(self, "_loading")

    def _on_session(self, change: dict[str, Any]) -> None:
        if self._applying:
            return
        self._ui.call(self._load)

    def _load(self, messages: bool = True) -> None:
        """Show the session's values in the controls (and clear the inline messages: they are valid)."""
        s = self.session
        with self._hold():
            options = self._provider_options()
            if options != list(self.provider.options):
                self.provider.options = options
            self.provider.value = s.provider
            self.emulator.value = bool(s.emulator)
            for opt in TABLE:
                self._write(opt.name, getattr(s, opt.name))
        self._update_rules()
        if messages:
            self._show_messages({}, self.notes())
        self._render_state()

    def _update_rules(self) -> None:
        """Show only the chosen provider's controls; enable only what applies."""
        kind = self.kind
        for families, box in self.family_boxes.items():
            _show(box, kind in families)
        name = self.provider.value
        registered = self.session._registered.get(name)
        self.model.placeholder = (registered.config.model if registered else DEFAULT_MODELS.get(kind)
                                  or "optional, e.g. gpt-4.1")  # Foundry: the orchestrator deployment
        custom = self.size.value == CUSTOM
        _show(self.custom_size, custom)
        self.custom_size.disabled = not custom
        compressible = self.output_format.value in COMPRESSIBLE_FORMATS
        self.compression_on.disabled = not compressible
        self.compression.disabled = not (compressible and self.compression_on.value)

    def _render_state(self) -> None:
        if self._snapshot is not None:
            self._snapshot.update(self.snapshot(), raw=True)
        self.in_effect.value = (f'<span class="nbi-in-effect-text" style="color:#555">In effect: '
                                f"{html.escape(self.session.summary())}</span>")
        kept = self.session.inactive_options() if self._known() else {}
        if kept:
            owners = " and ".join(sorted({option(n).owner for n in kept}))
            label = PROVIDER_LABELS.get(self.kind, self.kind)
            values = ", ".join(f"{n}={option(n).show(v)}" for n, v in kept.items())
            self.inactive.value = (f'<span class="nbi-inactive-text" style="color:#8a8a8a">Kept for {owners}, '
                                   f"not used with {html.escape(label)}: {html.escape(values)}</span>")
        else:
            self.inactive.value = ""
        self._render_keys()

    def _known(self) -> bool:
        try:
            self.session.kind()
        except ConfigError:
            return False
        return True

    def _render_keys(self) -> None:
        status = self.session.key_status()
        rows = []
        for name in self.session.providers:
            label = PROVIDER_LABELS.get(name, name)
            ok = status.get(name, False)
            mark = "set" if ok else "not set"
            colour = "#1b7f3b" if ok else "#8a8a8a"
            chosen = name == self.provider.value
            weight = "bold" if chosen else "normal"
            rows.append(f'<span class="nbi-key nbi-key-{html.escape(name)}" data-set="{str(ok).lower()}" '
                        f'style="margin-right:12px;font-weight:{weight};color:{colour};white-space:nowrap;'
                        'display:inline-block">'
                        f'{html.escape(label)}: {"●" if ok else "○"} {mark}</span>')
        chosen = self.provider.value
        hint = ""
        if self.emulator.value:
            hint = "The offline emulator answers every request: no key is needed."
        elif self._kind(chosen) == "foundry":
            sources = foundry_credential_sources()
            where = ", ".join(sources) if sources else "none found: sign in with az login, or set AZURE_CLIENT_ID..."
            endpoint = "" if status.get(chosen) else "Fill Project endpoint (or set AZURE_AI_PROJECT_ENDPOINT). "
            hint = f"{endpoint}Foundry signs in with Microsoft Entra ID (DefaultAzureCredential; {where})."
        elif not status.get(chosen, False):
            names = " and ".join(" or ".join(group) for group in KEY_ENV.get(self._kind(chosen), ()))
            hint = (f"{PROVIDER_LABELS.get(chosen, chosen)} has no key: set {names} (with getpass or a .env "
                    "file, not %env) or tick the offline emulator.")
        self.keys.value = ("<div>" + "".join(rows) + "</div>"
                           + (f'<div class="nbi-key-hint" style="color:#555">{html.escape(hint)}</div>' if hint
                              else ""))


class _Flag:
    """``with _Flag(obj, "attr"):`` sets a boolean attribute for the block (re-entrant)."""

    def __init__(self, owner: object, attr: str) -> None:
        self.owner, self.attr = owner, attr

    def __enter__(self) -> None:
        self.old = getattr(self.owner, self.attr)
        setattr(self.owner, self.attr, True)

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.attr, self.old)


def _live_style(sid: str) -> w.HTML:
    """An invisible part of a live widget: while it is on the page, the static copy displayed after the
    widget (``data-nbi-snapshot=sid``) is hidden; when the widget is gone, the copy shows."""
    css = (f'[data-nbi-snapshot="{sid}"]{{display:none!important}}'
           f'.jp-OutputArea-child:has([data-nbi-snapshot="{sid}"]){{display:none!important}}')
    return w.HTML(f"<style>{css}</style>", layout=w.Layout(height="0px", margin="0px", overflow="hidden"))


def _static_copy(sid: str, inner: str) -> str:
    """The HTML of a static copy. A notebook saved with live widgets keeps only their ids; reopened
    without their kernel, JupyterLab writes "Error displaying widget: model not found" in their
    place. The copy's own style hides that line (the output just before it, once it is an error)."""
    hide = (f'.jp-OutputArea-child:has(> .jp-OutputArea-output.jupyter-widgets)'
            f':has(+ .jp-OutputArea-child [data-nbi-snapshot="{sid}"]){{display:none}}')
    return f'<div class="nbi-snapshot" data-nbi-snapshot="{sid}"><style>{hide}</style>{inner}</div>'


def _display_live(widget: w.Widget, text: str, copy: dict[str, Any]) -> Any:
    """Display ``widget`` (with ``text`` as its plain-text form, never a ``VBox(children=...`` repr), then
    its static ``copy``, and return the copy's display handle (for updates).

    Two outputs because a frontend renders one representation per output, and the widget one wins
    wherever widgets are installed: the copy is what a saved notebook shows once the widget is gone
    (reopened without its kernel, on GitHub, in nbconvert), while the live widget hides it.
    """
    from IPython.display import display

    data = widget._repr_mimebundle_()
    data["text/plain"] = text
    display(data, raw=True)
    return display(copy, raw=True, display_id=True)


def _close_tree(widget: w.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


# ------------------------------------------------------------------------------------------------
# Studio
# ------------------------------------------------------------------------------------------------


def plain_error(exc: BaseException) -> str:
    """An error as one line for the studio: what happened and what to do (no traceback, no type name,
    secrets masked)."""
    if isinstance(exc, ContentPolicyError):
        reason = f" ({exc.reason})" if exc.reason else ""
        text = f"The provider's safety system refused this request{reason}: rephrase the prompt and try again."
    elif isinstance(exc, (ProviderError, ConfigError, InputError, ImagineError)):
        text = str(exc)
    elif isinstance(exc, KeyError):
        text = str(exc.args[0]) if exc.args else "Not found."
    elif isinstance(exc, OSError):
        text = _file_problem(exc)
    else:
        text = f"Something went wrong ({type(exc).__name__}): {exc}"
    return redact(text)


def _file_problem(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """An OSError in words (``[Errno 17] File exists`` is not a message)."""
    where = str(path or exc.filename or "the file")
    if isinstance(exc, FileExistsError):
        return f"{where} already exists: tick overwrite, or choose another name"
    if isinstance(exc, PermissionError):
        return f"Cannot write {where}: permission denied; choose a folder you can write to"
    if isinstance(exc, IsADirectoryError):
        return f"{where} is a folder: end the name with / to save into it"
    if isinstance(exc, NotADirectoryError):
        return f"Part of {where} is a file, not a folder: choose another path"
    reason = exc.strerror or str(exc)
    return f"Cannot write {where}: {reason[:1].lower() + reason[1:]}"


def _path_problem(exc: OSError | ValueError, target: str) -> str:
    """A path the user typed that cannot be used, in words (``ValueError: embedded null byte`` is not one)."""
    if isinstance(exc, OSError) and exc.errno != errno.ENAMETOOLONG:
        return _file_problem(exc)
    if isinstance(exc, ValueError) and not re.search(r"null|file name", str(exc)):
        return f"Cannot save: {plain_error(exc)}"
    shown = repr(target) if len(target) <= 80 else repr(target[:60]) + f"… ({len(target)} characters)"
    why = "a name in it is too long" if isinstance(exc, OSError) else "it holds a character no file name can hold"
    return f"Cannot save to {shown}: {why}; type another folder/ or file name"


def _data_url(data: bytes, media_type: str) -> str:
    import base64

    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _thumb_url(entry: HistoryEntry, side: int) -> str | None:
    """A history thumbnail as a data URL; None when the file is gone or unreadable (the entry stays listed)."""
    try:
        thumb = entry.thumbnail(side)
    except (OSError, ValueError, ImagineError):
        return None
    return _data_url(thumb, sniff_media_type(thumb) or "image/jpeg")


def _preview_url(image: BinaryResult | HistoryEntry, max_side: int) -> str | None:
    """A reduced copy as a data URL; None when it cannot be made (a history file gone, undecodable bytes)."""
    from ._display import preview

    try:
        data, media_type = preview(getattr(image, "image", image), max_side=max_side)  # an entry reads its file
    except (OSError, ValueError, ImagineError):
        return None
    return _data_url(data, media_type)


class StudioView(anywidget.AnyWidget):
    """The studio's front end: ``static/studio.js`` and ``static/studio.css`` (anywidget; no build step).

    Every trait is state the page shows; the page sends actions back as custom messages
    ``{"action": ...}`` (generate, edit, cancel, page, refresh, open, close, compare, save, mask, unmask),
    which :class:`Studio` handles. Tests send the same messages with ``_handle_custom_msg``. ``painter`` is
    the :class:`~nbimagine._painter.MaskPainter` over the image being masked (``mask_id``), shown inside
    the page through the widget manager.
    """

    _esm = STATIC / "studio.js"
    _css = STATIC / "studio.css"

    summary = t.Unicode("").tag(sync=True)
    budget = t.Unicode("").tag(sync=True)  # what is left of the budgets (%imagine budget), one line each
    prompt = t.Unicode("").tag(sync=True)
    save_path = t.Unicode("").tag(sync=True)
    overwrite = t.Bool(False).tag(sync=True)
    running = t.Bool(False).tag(sync=True)
    activity = t.Dict().tag(sync=True)  # label, elapsed, note, partials (data URLs), partial_label
    status = t.Dict().tag(sync=True)  # kind (done, failed, cancelled), text: how the last run ended
    error = t.Unicode("").tag(sync=True)
    result = t.Dict().tag(sync=True)  # id, src, lines, prompt: the last result, shown on the stage
    items = t.List(t.Dict()).tag(sync=True)  # the gallery page: id, thumb, prompt, parents
    page = t.Int(0).tag(sync=True)
    pages = t.Int(1).tag(sync=True)
    total = t.Int(0).tag(sync=True)
    selected = t.List(t.Int()).tag(sync=True)
    save_feedback = t.Dict().tag(sync=True)  # kind (ok, error), text: shown beside Save
    detail = t.Dict().tag(sync=True)  # the open image: id, src, prompt, meta rows, lineage, parents
    compare = t.Dict().tag(sync=True)  # left, right: id, src, lines
    painter = t.Instance(MaskPainter, allow_none=True).tag(sync=True, **w.widget_serialization)
    mask_id = t.Int(0).tag(sync=True)  # the history id the painter is over (0: no painter)


class Studio:
    """Prompt, Generate / Edit selected / Cancel, progress in place, the result, and the history gallery
    (select by click or keyboard, details with lineage, side-by-side compare, Save). Paint mask opens the
    mask painter over the first selected image; Edit selected then changes only the painted region (the
    mask is recorded in the history, so the lineage shows image, mask and edit), and the new image is
    selected.

    ``session`` defaults to the shared session and ``history`` to the notebook's history. The page
    is :class:`StudioView` (``view``); ``widget`` is what is displayed (the settings panel, when
    ``settings``, above the view). Every action of the page is a method here as well (``start``,
    ``stop``, ``show_page``, ``set_selection``, ``open``, ``compare``, ``close_panels``,
    ``save_selected``, ``paint_mask``, ``close_mask``), which is how scripts and tests drive it.

    Displayed in a notebook, the studio leaves a static copy of its gallery (thumbnails and captions
    as HTML) after the live widget: hidden while the widget lives, it is what a saved notebook shows
    when it is reopened without its kernel, or on GitHub and in nbconvert.
    """

    def __init__(self, session: ImagineSession | None = None, history: History | None = None, *,
                 per_page: int = 24, settings: bool = True) -> None:
        self.session = session or get_session()
        if history is None:
            from ._history import history as current_history

            history = current_history()
        self.history = history
        self.per_page = per_page
        self.generation: Generation | None = None
        self._ui = _UIThread(lambda exc: self._set_error(plain_error(exc)))
        self._lock = self._ui.lock
        self._idle = threading.Event()  # set when no generation runs and its results are shown
        self._idle.set()
        self._snapshot: Any = None  # the display handle of the static copy, once displayed

        self.snapshot_id = secrets.token_hex(8)  # pairs the live widget with its static copy
        self.view = StudioView()
        self.view.on_msg(self._on_msg)
        self.settings: ProviderPanel | None = ProviderPanel(self.session) if settings else None
        parts: list[w.Widget] = []
        if self.settings is not None:
            accordion = w.Accordion(children=[self.settings.widget], selected_index=None)
            accordion.set_title(0, "Provider settings")
            accordion.add_class("nbi-settings")
            parts.append(accordion)
        parts += [self.view, _live_style(self.snapshot_id)]
        self.widget = w.VBox(parts)
        self.widget.add_class("nbi-studio")
        self.session.observe(self._on_session, names=list(self.session.trait_names()))
        from ._budget import subscribe

        # %imagine budget, spending and holds (any cell, thread or generation) show at once.
        self._unsubscribe_budget = subscribe(lambda: self._dispatch(self._render_summary))
        self._render_summary()
        self.show_page(0)

    # --- state, as the page shows it ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True from Generate until the result (or error) is shown."""
        return self.view.running

    @property
    def selected(self) -> list[int]:
        """The selected history ids, in the order they were selected."""
        return list(self.view.selected)

    @property
    def page(self) -> int:
        return self.view.page

    @property
    def last_error(self) -> str | None:
        return self.view.error or None

    @property
    def painter(self) -> MaskPainter | None:
        """The mask painter open in the studio (:meth:`paint_mask`), or ``None``."""
        return self.view.painter

    # --- display -----------------------------------------------------------------------------------

    def _ipython_display_(self) -> None:
        self._snapshot = _display_live(self.widget, repr(self), self.snapshot())

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = self.snapshot()["text/html"]
        return bundle

    def __repr__(self) -> str:
        return f"<nbimagine studio: {self.session.summary()}; {len(self.history)} image(s) in the history>"

    def snapshot(self, limit: int = 12, side: int = 96) -> dict[str, Any]:
        """The static copy: the newest ``limit`` images as ``side`` px thumbnails with id and prompt.

        See :func:`_display_live` for how it and the live widget take turns.
        """
        sid = self.snapshot_id
        entries = self.history.page(0, limit)
        total = len(self.history)
        cells = []
        for entry in entries:
            url = _thumb_url(entry, side)
            img = (f'<img src="{url}" alt="{entry.ref}" style="width:{side}px;height:{side}px;object-fit:contain;'
                   'display:block"/>' if url else
                   f'<div style="width:{side}px;height:{side}px;border:1px dashed #999">file missing</div>')
            prompt = html.escape(" ".join(entry.prompt.split()))
            cells.append(f'<figure style="margin:0;width:{side}px" title="{prompt}">{img}'
                         f'<figcaption style="font-size:11px;white-space:nowrap;overflow:hidden;'
                         f'text-overflow:ellipsis"><b>{entry.ref}</b> {prompt}</figcaption></figure>')
        more = f" (the newest {len(entries)} shown)" if total > len(entries) else ""
        head = (f"nbimagine studio: {total} image{'s' if total != 1 else ''} in the history of "
                f"{self.history.notebook!r}{more}. A saved copy: run the cell to use the studio.")
        body = _static_copy(sid, f'<div style="margin-bottom:4px">{html.escape(head)}</div>'
                                 '<div style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(cells) + "</div>")
        plain = [head] + [f"  {e.ref}  {' '.join(e.prompt.split())[:70]}" for e in entries]
        return {"text/plain": "\n".join(plain), "text/html": body}

    def _update_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.update(self.snapshot(), raw=True)

    def close(self) -> None:
        """Cancel a running generation, stop following the session, close the widgets."""
        self.stop()
        self.close_mask()
        self.session.unobserve(self._on_session, names=list(self.session.trait_names()))
        self._unsubscribe_budget()
        if self.settings is not None:
            self.settings.close()
        _close_tree(self.widget)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no generation runs (True) or ``timeout`` passes (False).

        For scripts and tests: in a kernel, updates are delivered on the main thread, so do not
        call this from a cell while the studio is running.
        """
        return self._idle.wait(timeout)

    # --- actions from the page -----------------------------------------------------------------------

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict):
            return
        action = content.get("action")
        try:
            if action == "generate":
                self.start()
            elif action == "edit":
                self.start(edit=True)
            elif action == "cancel":
                self.stop()
            elif action == "page":
                self.show_page(int(content.get("page", 0)))
            elif action == "refresh":
                self.show_page(self.page)
            elif action == "open":
                self.open(int(content["id"]))
            elif action == "close":
                self.close_panels()
            elif action == "compare":
                first, second = (int(i) for i in content.get("ids", [])[:2])
                self.compare(first, second)
            elif action == "save":
                self.save_selected()
            elif action == "mask":
                self.paint_mask()
            elif action == "unmask":
                self.close_mask()
        except (KeyError, TypeError, ValueError) as exc:  # a malformed message: say so, never raise in the comm
            self._set_error(f"The studio could not do {action!r}: {exc}")

    def _dispatch(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the studio's own thread (see :class:`_UIThread`)."""
        self._ui.call(fn, *args)

    # --- generation --------------------------------------------------------------------------------

    def start(self, edit: bool = False) -> Generation | None:
        """What Generate (``edit=False``) and Edit selected (``edit=True``) do. None if refused."""
        from ._generate import Generation
        from ._session import credentials_advice

        with self._lock:
            if self.running:
                return None
            prompt = self.view.prompt.strip()
            self.view.status = {}  # a refusal is the only message: no stale "Done in" / "Failed after"
            if not prompt:
                self._set_error("Write a prompt first" + (": describe the edit." if edit else "."))
                return None
            selected = self.selected
            if edit and not selected:
                self._set_error("Select one or more images in the gallery first, then Edit selected.")
                return None
            painter = self.view.painter if edit else None
            mask = painter.mask if painter is not None else None
            if painter is not None and selected[0] != self.view.mask_id:
                self._set_error(f"The mask is painted on #{self.view.mask_id}, the image an edit changes: select it "
                                "first, or Close mask to edit without it.")
                return None
            if painter is not None and mask is None:
                self._set_error("Nothing is painted yet: paint the region to change, or Close mask to edit the "
                                "whole image.")
                return None
            try:
                edits = [self.history.get(i).image for i in selected] if edit else []
                generation = Generation(prompt, edits=edits, mask=mask, session=self.session, history=self.history,
                                        retry_advice=STUDIO_RETRY_ADVICE, offline_advice=STUDIO_OFFLINE)
                generation.build_agent()
            except Exception as exc:
                self._set_error(plain_error(exc))
                return None
            try:
                generation.check_credentials()
            except ConfigError as exc:
                self._set_error(credentials_advice(self.session, generation.provider, exc, offline=STUDIO_OFFLINE))
                return None
            try:
                generation.start(on_event=self._on_event)
            except Exception as exc:
                self._set_error(plain_error(exc))
                return None
            self.generation = generation
            self._idle.clear()
            what = f"Editing {', '.join(f'#{i}' for i in selected)}" if edit else "Generating"
            if mask is not None:
                what += " in the mask"
            self._set_error("")
            self.view.save_feedback = {}
            # The stage shows the result being made, never the previous one beside it.
            self.view.result = {}
            self.view.activity = {"label": what, "elapsed": 0.0, "partials": []}
            self.view.running = True
            assert generation.job is not None
            generation.job.future.add_done_callback(lambda _f: self._dispatch(self._finish, generation))
            return generation

    def stop(self) -> None:
        """What Cancel does: abort the running requests."""
        generation = self.generation
        if generation is not None and self.running:
            generation.cancel()

    def _on_event(self, index: int, event: Any) -> None:
        # Called on the background loop's thread: hand over, never touch widgets here.
        from ._generate import Retrying
        from .events import PartialImageEvent, StatusEvent

        if isinstance(event, PartialImageEvent):
            self._dispatch(self._show_partial, event.index, event.image)
        elif isinstance(event, Retrying):
            self._dispatch(self._show_note, str(event))
        elif isinstance(event, StatusEvent):  # a background response: queued, in progress...
            self._dispatch(self._show_note, f"background response {event.status.replace('_', ' ')}")

    def _show_partial(self, index: int, image: BinaryResult) -> None:
        if not self.running or self.generation is None:
            return
        url = _preview_url(image, PREVIEW_SIDE // 2)
        if url is None:  # a broken partial: the final image may still be fine
            return
        self.view.activity = {**self.view.activity, "elapsed": self.generation.elapsed, "partials": [url],
                              "partial_label": f"partial image {index + 1}", "note": ""}

    def _show_note(self, note: str) -> None:
        if self.running and self.generation is not None:
            self.view.activity = {**self.view.activity, "elapsed": self.generation.elapsed, "note": note}

    def _finish(self, generation: Generation) -> None:
        if generation is not self.generation:
            return
        try:
            elapsed = generation.elapsed
            cancelled = bool(generation.stopped)
            errors = [e for e in generation.errors if e is not None]
            entries = generation.entries
            # Every image the provider returned, recorded or not (a failed history write loses none).
            images = [image for index in range(generation.n) for image in generation.images(index)]
            notes: list[str] = []  # every message is shown: the error, a missing preview, each warning
            if cancelled:
                kept = (f"; the {len(images)} image(s) that had arrived are kept" if images
                        else "; nothing was recorded")
                self.view.status = {"kind": "cancelled", "text": f"Cancelled after {elapsed:.1f} s{kept}."}
            elif errors:
                self.view.status = {"kind": "failed", "text": f"Failed after {elapsed:.1f} s."}
                notes.append(plain_error(errors[0]))
            else:
                self.view.status = {"kind": "done", "text": f"Done in {elapsed:.1f} s."}
            result: dict[str, Any] = {}
            if images and not cancelled:
                result = self._result(images[0], elapsed, len(images), entries[0] if entries else None)
                if not result.get("src"):
                    notes.append(f"No preview of {result['lines'][0].split(' · ')[0]}: {result.get('problem')}")
            notes += generation.warnings
            if not images and not cancelled and not errors:
                texts = [r.body for r in generation.replies if r is not None and r.body]
                notes.append("The model answered without an image" + (f": {texts[0][:300]}" if texts else "."))
            if notes:
                self._set_error(" ".join(notes))
            self.view.result = {k: v for k, v in result.items() if k != "problem"}
            if entries:
                # The new image is what the next Save or Edit selected works on; its mask has been used.
                self.view.selected = [e.id for e in entries]
                if generation.mask is not None:
                    self.close_mask()
            self.view.activity = {}
            self.view.running = False
            self._render_summary()  # the budget left
            self.show_page(0)
            self._update_snapshot()
        finally:
            self._idle.set()

    def _result(self, image: BinaryResult, elapsed: float, count: int, entry: HistoryEntry | None
                ) -> dict[str, Any]:
        """The stage's result: preview, caption lines (id, provider, size..., then the prompt)."""
        from ._display import caption_for, preview

        problem = None
        try:
            data, media_type = preview(image, max_side=PREVIEW_SIDE)
            src: str | None = _data_url(data, media_type)
        except ImagineError as exc:  # kept and named, not previewed
            src, problem = None, str(exc)
        caption = caption_for(image, history_id=entry.id if entry else None, elapsed=elapsed,
                              provider=entry.provider if entry else None, model=entry.model if entry else None,
                              parents=entry.parents if entry else ())
        head, *more = caption.split("\n")
        if count > 1:
            head += f" · +{count - 1} more in the gallery"
        prompt = entry.prompt if entry else (self.generation.prompt if self.generation else "")
        return {"id": entry.id if entry else None, "src": src, "prompt": prompt, "problem": problem,
                "lines": [head, " ".join(prompt.split())[:300], *more]}

    def _set_error(self, message: str) -> None:
        self.view.error = message

    # --- gallery -------------------------------------------------------------------------------------

    def show_page(self, page: int) -> None:
        """Show gallery page ``page`` (0 = newest), clamped to the pages there are."""
        total = len(self.history)
        pages = max(1, -(-total // self.per_page))
        page = min(max(page, 0), pages - 1)
        entries = self.history.page(page, self.per_page)
        items = [{"id": e.id, "prompt": " ".join(e.prompt.split()), "thumb": _thumb_url(e, THUMB_SIDE),
                  "parents": list(e.parents)} for e in entries]
        with self.view.hold_sync():
            self.view.total, self.view.pages, self.view.page = total, pages, page
            self.view.items = items

    def set_selection(self, ids: Sequence[int]) -> None:
        """Select these history ids (replacing the selection)."""
        self.view.selected = list(dict.fromkeys(int(i) for i in ids))

    def open(self, entry_id: int) -> None:
        """What clicking ⤢, double-clicking or Enter on a tile does: the image with all its metadata and lineage."""
        try:
            entry = self.history.get(entry_id)
        except KeyError as exc:
            self._set_error(plain_error(exc))
            return
        try:
            chain = self.history.lineage(entry.id)
        except (KeyError, ImagineError):
            chain = [entry]
        self.view.compare = {}
        self.view.detail = {
            "id": entry.id, "src": _preview_url(entry, PREVIEW_SIDE), "prompt": entry.prompt,
            "parents": list(entry.parents), "meta": _metadata_rows(entry),
            "lineage": [{"id": e.id, "thumb": _thumb_url(e, THUMB_SIDE // 2), "prompt": e.prompt} for e in chain],
        }

    def compare(self, first: int, second: int) -> None:
        """Two images side by side (an edit and its source, or any two selected)."""
        sides = []
        for entry_id in (first, second):
            try:
                entry = self.history.get(entry_id)
            except KeyError as exc:
                self._set_error(plain_error(exc))
                return
            edited = ["edited from " + ", ".join(f"#{p}" for p in entry.parents)] if entry.parents else []
            head = " · ".join([entry.ref, f"{entry.provider}/{entry.model}", f"{entry.width}x{entry.height}", *edited])
            sides.append({"id": entry.id, "src": _preview_url(entry, PREVIEW_SIDE // 3 * 2),
                          "lines": [head, " ".join(entry.prompt.split())[:200]]})
        self.view.detail = {}
        self.view.compare = {"left": sides[0], "right": sides[1]}

    def close_panels(self) -> None:
        """Back from the details or the comparison to the gallery."""
        self.view.detail = {}
        self.view.compare = {}

    # --- masks -------------------------------------------------------------------------------------

    def paint_mask(self, entry_id: int | None = None) -> MaskPainter | None:
        """What Paint mask does: a :class:`~nbimagine._painter.MaskPainter` over ``entry_id`` (default: the
        first selected image, the one Edit selected changes), shown in the studio; ``entry_id`` leads the
        selection. Edit selected then sends what is painted as the mask. None if refused (said on the page)."""
        selected = self.selected
        target = entry_id if entry_id is not None else (selected[0] if selected else None)
        if target is None:
            self._set_error("Select the image to mask in the gallery first, then Paint mask.")
            return None
        try:
            entry = self.history.get(target)
            painter = MaskPainter(entry.image, label=entry.ref)
        except (KeyError, OSError, ImagineError) as exc:
            self._set_error(plain_error(exc))
            return None
        self.close_mask()
        with self.view.hold_sync():
            self.view.selected = [target, *(i for i in selected if i != target)]
            self.view.painter, self.view.mask_id = painter, target
        self._set_error("")
        return painter

    def close_mask(self) -> None:
        """What Close mask does: the painter goes, and Edit selected changes the whole image again."""
        painter = self.view.painter
        with self.view.hold_sync():
            self.view.painter, self.view.mask_id = None, 0
        if painter is not None:
            painter.close()

    # --- saving ------------------------------------------------------------------------------------

    def save_selected(self, path: str | None = None, *, overwrite: bool | None = None) -> list[Path]:
        """What Save does: write the selected images at full resolution.

        ``path`` (default: the Save field) is a folder (ending in ``/``, or an existing folder), where
        each image gets the name ``%imagine export`` gives it (``16-put-a-tiny-beret-on-the-cat.png``),
        a taken name getting ``-2``; or a file name, for one image, whose extension may ask for another
        format (transparency saved as JPEG is flattened onto white). An existing file is never replaced
        unless ``overwrite`` (default: the overwrite box). The outcome is one line beside Save.
        """
        target = (path if path is not None else self.view.save_path).strip()
        overwrite = self.view.overwrite if overwrite is None else overwrite
        ids = self.selected
        self.view.save_feedback = {}  # never a stale success line above a new error
        if not ids:
            return self._save_failed("Select the image(s) to save in the gallery first")
        if not target:
            return self._save_failed("Type where to save: a folder/ (readable names) or a file such as out/fox.png")
        try:
            folder = target.endswith(("/", os.sep)) or Path(target).expanduser().is_dir()
        except (OSError, ValueError) as exc:  # a NUL, a name too long: the typed path, in words
            return self._save_failed(_path_problem(exc, target))
        if len(ids) > 1 and not folder:
            return self._save_failed(f"{len(ids)} images are selected: give a folder (ending in /) to save them all")
        written: list[Path] = []
        notes: list[str] = []
        for entry_id in ids:
            try:
                entry = self.history.get(entry_id)
                destination, note = _save_entry(entry, target, folder=folder, overwrite=overwrite)
            except KeyError as exc:
                return self._save_failed(plain_error(exc), written)
            except (OSError, ValueError) as exc:
                return self._save_failed(_path_problem(exc, target), written)
            except ImagineError as exc:
                return self._save_failed(plain_error(exc), written)
            written.append(destination)
            if note:
                notes.append(note)
        where = written[0].parent if folder else written[0]
        names = ", ".join(f"#{i}" for i in ids)
        shown = f"{len(written)} images to {where}" if len(written) > 1 else f"#{ids[0]} to {where}"
        text = f"Saved {shown}" + (f" ({'; '.join(notes)})" if notes else "")
        self.view.save_feedback = {"kind": "ok", "text": text, "ids": names}
        return written

    def _save_failed(self, message: str, written: Sequence[Path] = ()) -> list[Path]:
        done = f" (saved before it: {', '.join(p.name for p in written)})" if written else ""
        self.view.save_feedback = {"kind": "error", "text": redact(message) + done}
        return list(written)

    # --- session -----------------------------------------------------------------------------------

    def _on_session(self, change: dict[str, Any]) -> None:
        self._dispatch(self._render_summary)

    def _render_summary(self) -> None:
        self.view.summary = self.session.summary()
        self.view.budget = self._budget_text()

    def _budget_text(self) -> str:
        """What is left of the notebook's and the session's budgets (%imagine budget), when set."""
        from ._budget import budget_lines

        if self.session.budget_usd is None and self.history.budget_usd is None:
            return ""
        return "\n".join(budget_lines(self.session, self.history))


STUDIO_RETRY_ADVICE = "raise Max retries in the studio's provider settings"
STUDIO_OFFLINE = "tick 'Offline emulator' in the studio's provider settings to work offline"


def _metadata_rows(entry: HistoryEntry) -> list[list[str]]:
    """Everything known about an entry, as (label, value) rows for the details panel."""
    from ._cost import format_usd
    from ._display import cost_label

    charged = entry.metadata.get("budget_charge_usd")
    cost = cost_label(entry.metadata) or (
        f"unknown (budgets count {format_usd(charged)}: its request's estimated high end)"
        if isinstance(charged, (int, float)) and not isinstance(charged, bool) else "")
    rows = [["id", entry.ref], ["created", entry.created_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip()],
            ["provider", entry.provider or ""], ["model", entry.model or ""],
            ["size", f"{entry.width}x{entry.height}" if entry.width else ""],
            ["format", entry.media_type], ["bytes", human_bytes(entry.size_bytes)], ["cost", cost]]
    if entry.parents:
        rows.append(["edited from", ", ".join(f"#{p}" for p in entry.parents)])
    if entry.revised_prompt:
        rows.append(["revised prompt", entry.revised_prompt])
    rows += [[name, str(value)] for name, value in sorted(entry.params.items())]
    if entry.text:
        rows.append(["reply text", entry.text])
    for name in ("finish_reason", "call_id", "response_id", "quality", "background", "output_format", "size"):
        value = entry.metadata.get(name)
        if value not in (None, "") and not any(row[0] == name for row in rows):
            rows.append([name.replace("_", " "), str(value)])
    rows.append(["sha256", entry.sha256])
    return [row for row in rows if row[1]]


def _save_entry(entry: HistoryEntry, target: str, *, folder: bool, overwrite: bool) -> tuple[Path, str]:
    """Write one history image; return where it went and a note (a taken name, a conversion) or "".

    Into a folder it gets the name ``%imagine export`` gives (``<id>-<slug>.<ext>``), ``-2``, ``-3``...
    when taken by another file (the same image already there is not copied again); as a file, an
    existing one is only replaced with ``overwrite``. Writing goes through :class:`~nbimagine._files.Folder`:
    never outside the folder given, never through a symlink.
    """
    from ._files import Folder
    from ._history import _slug

    image = entry.image
    if folder:
        name = f"{entry.id}-{_slug(entry.prompt)}.{entry.ext}"
        where = Path(target).expanduser()
        try:
            opened = Folder.open(where)
        except FileExistsError:  # a file where the folder should be: overwrite would not help
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(where)) from None
        with opened as out:
            there = out.lstat(name) is not None
            if overwrite:
                used = out.write(name, image.data, overwrite=True, durable=False)
            else:
                used = out.write_unique(name, image.data, durable=False)
            note = (f"{name} is taken: saved as {used}" if used != name
                    else "the same image was already there" if there and not overwrite else "")
            return out.path / used, note
    path = Path(target).expanduser()
    wanted = media_type_for_suffix(path.suffix)
    if wanted is None:  # "fox" or "fox.v2": the image's own format
        path, wanted = path.with_name(f"{path.name}.{image.extension}"), image.media_type
    data, note = (image.data, "") if wanted == image.media_type else _converted(image, wanted)
    try:
        with Folder.open(path.parent) as out:
            out.write(path.name, data, overwrite=overwrite, durable=False)
            return out.path / path.name, note
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None


def _converted(image: BinaryResult, media_type: str) -> tuple[bytes, str]:
    from ._images import EXTENSIONS, flattened, has_alpha

    pil = image.to_pil()
    kind = EXTENSIONS[media_type].upper().replace("JPG", "JPEG")
    note = f"converted to {kind}"
    if media_type == "image/jpeg":
        if has_alpha(pil):
            note += ", transparency flattened onto white"
        pil = flattened(pil)
    buffer = io.BytesIO()
    pil.save(buffer, format=kind)
    return buffer.getvalue(), note


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def panel(session: ImagineSession | None = None) -> ProviderPanel:
    """The provider settings panel (``%imagine panel``), bound to the shared session."""
    return ProviderPanel(session)


def studio(session: ImagineSession | None = None, history: History | None = None, *,
           per_page: int = 24, settings: bool = True) -> Studio:
    """The studio (``%imagine studio``): prompt, generate, partial images, result and history gallery."""
    return Studio(session, history, per_page=per_page, settings=settings)

