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
import html
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from ._images import sniff_media_type
from ._options import EVERY_PROVIDER, IMAGE_CONFIG, IMAGE_TOOL, Option, option, options_for
from ._options import OPTIONS as TABLE
from ._session import DEFAULT_MODELS, KEY_ENV, ImagineSession, foundry_credential_sources, get_session
from .config import GEMINI_NEWEST_ONLY_RATIOS, GEMINI_NEWEST_ONLY_SIZES
from .errors import ConfigError, ContentPolicyError, HistoryError, ImagineError, InputError, ProviderError, redact

if TYPE_CHECKING:
    from ._generate import Generation
    from ._history import History, HistoryEntry
    from .events import BinaryResult, StreamEvent

__all__ = ["PROVIDER_LABELS", "ProviderPanel", "Studio", "panel", "plain_error", "studio"]

PROVIDER_LABELS = {
    "openai": "OpenAI",
    "azure": "Azure OpenAI",
    "foundry": "Microsoft Foundry agent",
    "gemini": "Gemini",
    "vertex": "Vertex AI",
}
DEFAULT = ""  # the "provider default" choice of a dropdown (the session's None)
CUSTOM = "custom"  # the size dropdown's "custom WxH" choice
COMPRESSIBLE = ("jpeg", "webp")
THUMB_SIDE = 192
PREVIEW_SIDE = 768

def _choices(values: Sequence[str], default_label: str = "default") -> list[tuple[str, str]]:
    return [(default_label, DEFAULT), *((v, v) for v in values)]


def _wide() -> w.Layout:  # one Layout per control: hiding one must not hide the others
    return w.Layout(width="360px")


def _opt(value: str) -> str | None:
    return value or None


def _show(widget: w.Widget, visible: bool) -> None:
    widget.layout.display = None if visible else "none"


def _is_shown(widget: w.Widget) -> bool:
    return widget.layout.display != "none"


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

    The controls are made from the option table (:data:`nbimagine._options.OPTIONS`): one per row,
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
        self._style = {"description_width": "110px"}

        self.provider = w.Dropdown(description="Provider", options=self._provider_options(), style=self._style,
                                   layout=_wide())
        self.emulator = w.Checkbox(description="Offline emulator (no key needed)", indent=False)
        self.keys = w.HTML()
        self.refresh_keys = w.Button(description="Check keys", icon="refresh", tooltip="Read the environment again",
                                     layout=w.Layout(width="120px", min_width="120px"))
        self.in_effect = w.HTML()
        self.inactive = w.HTML()
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
            w.HBox([self.keys, self.refresh_keys]),
        ])
        self.widget.add_class("nbi-panel")
        for name in ("provider", "emulator", "custom_size", "compression_on", "in_effect", "inactive"):
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

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        return bundle

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
            on = self.controls["output_format"].value in COMPRESSIBLE and self.compression_on.value
            return control.value if on else None
        if name == "response_modalities":
            return [m for m, box in self.modalities.items() if box.value]
        if isinstance(control, w.Text):
            return control.value.strip() or None
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
            control.value = value or ""
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
        if wanted.get("background") == "transparent" and wanted.get("output_format") == "jpeg":
            found["output_format"] = "JPEG has no transparency: choose png or webp, or a background other than " \
                                     "transparent first"
        if "response_modalities" in wanted and not wanted["response_modalities"]:
            found["response_modalities"] = "Choose at least one response modality (IMAGE to get images)"
        return found

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
                self.output_format.value not in COMPRESSIBLE:
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
        value again and the reason is shown beside it. Only a custom size being typed stays, marked
        "not applied yet" with the size in effect.
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
        blocked = [name for name in problems if name != "size"] + (["apply"] if "apply" in problems else [])
        if blocked:
            # Put back what the session has, so that nothing on display is out of effect.
            self._load(messages=False)
            if changed in ("background", "output_format") and "output_format" in problems:
                shown = self.session.background if changed == "background" else self.session.output_format
                problems["output_format"] += f"; {changed.replace('_', ' ')} stays {shown or 'default'}"
        if "size" in problems:
            problems["size"] += f"; the size in effect is {self.session.size or 'the default'}"
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
        self.model.placeholder = registered.config.model if registered else DEFAULT_MODELS.get(kind, "")
        custom = self.size.value == CUSTOM
        _show(self.custom_size, custom)
        self.custom_size.disabled = not custom
        compressible = self.output_format.value in COMPRESSIBLE
        self.compression_on.disabled = not compressible
        self.compression.disabled = not (compressible and self.compression_on.value)

    def _render_state(self) -> None:
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
                        f'style="margin-right:12px;font-weight:{weight};color:{colour}">'
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


def _close_tree(widget: w.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


# ------------------------------------------------------------------------------------------------
# Studio
# ------------------------------------------------------------------------------------------------


def plain_error(exc: BaseException) -> str:
    """An error as one or two sentences for the panel (no traceback; secrets masked)."""
    if isinstance(exc, ContentPolicyError):
        reason = f" ({exc.reason})" if exc.reason else ""
        text = f"The provider's safety system refused this request{reason}. Rephrase the prompt and try again."
    elif isinstance(exc, ProviderError):
        text = f"The provider could not make the image: {exc}"
    elif isinstance(exc, ConfigError):
        text = f"Settings problem: {exc}"
    elif isinstance(exc, InputError):
        text = f"Input problem: {exc}"
    elif isinstance(exc, KeyError):
        text = str(exc.args[0]) if exc.args else "Not found."
    elif isinstance(exc, OSError):
        text = f"File problem: {exc}"
    elif isinstance(exc, ImagineError):
        text = str(exc)
    else:
        text = f"Something went wrong ({type(exc).__name__}): {exc}"
    return redact(text)


class _Tile:
    """One gallery cell: thumbnail, a select toggle labelled with the id, and the prompt."""

    def __init__(self, on_toggle: Callable[[_Tile, bool], None]) -> None:
        self.entry_id: int | None = None
        self.image = w.Image(format="jpeg", layout=w.Layout(width="128px", height="128px",
                                                              object_fit="contain"))
        self.select = w.ToggleButton(description="", layout=w.Layout(width="128px"), tooltip="Select")
        self.label = w.HTML(layout=w.Layout(width="128px", height="36px", overflow="hidden"))
        self.box = w.VBox([self.image, self.select, self.label],
                          layout=w.Layout(width="136px", margin="2px", padding="2px", border="1px solid #ddd"))
        self.box.add_class("nbi-tile")
        self.select.add_class("nbi-tile-select")
        self._on_toggle = on_toggle
        self._loading = False
        self.select.observe(self._changed, names="value")

    def show(self, entry: HistoryEntry | None, selected: bool) -> None:
        self._loading = True
        try:
            if entry is None:
                self.entry_id = None
                _show(self.box, False)
                self.select.value = False
                return
            self.entry_id = entry.id
            try:
                thumb = entry.thumbnail(THUMB_SIDE)
            except (OSError, ValueError, HistoryError):  # file deleted or unreadable: the entry is still listed
                thumb, missing = b"", "(file missing) "
            else:
                self.image.format = "png" if sniff_media_type(thumb) == "image/png" else "jpeg"
                missing = ""
            self.image.value = thumb
            self.select.description = entry.ref
            self.select.tooltip = f"Select {entry.ref}: {entry.prompt[:200]}"
            self.select.value = selected
            self.select.button_style = "info" if selected else ""
            prompt = " ".join(entry.prompt.split())
            short = prompt if len(prompt) <= 60 else prompt[:59] + "…"
            self.label.value = (f'<span title="{html.escape(prompt)}" style="font-size:11px;line-height:1.2">'
                                f"{missing}{html.escape(short)}</span>")
            _show(self.box, True)
        finally:
            self._loading = False

    def _changed(self, change: dict[str, Any]) -> None:
        self.select.button_style = "info" if change["new"] else ""
        if not self._loading and self.entry_id is not None:
            self._on_toggle(self, bool(change["new"]))


class Studio:
    """Prompt, Generate / Edit selected / Cancel, progress, the result, and the history gallery.

    ``session`` defaults to the shared session and ``history`` to the notebook's history.
    """

    def __init__(self, session: ImagineSession | None = None, history: History | None = None, *,
                 per_page: int = 24, settings: bool = True) -> None:
        self.session = session or get_session()
        if history is None:
            from ._history import history as current_history

            history = current_history()
        self.history = history
        self.per_page = per_page
        self.page = 0
        self.selected: list[int] = []  # history ids, in the order they were selected
        self.generation: Generation | None = None
        self.last_entries: list[HistoryEntry] = []
        self.last_error: str | None = None
        self._ui = _UIThread(lambda exc: self._set_error(plain_error(exc)))
        self._lock = self._ui.lock
        self._what = "Generating"
        self._running = False
        self._idle = threading.Event()  # set when no generation runs and its results are shown
        self._idle.set()
        self._started_at = 0.0
        self._ticker: threading.Thread | None = None

        self.summary = w.HTML()
        self.prompt = w.Textarea(placeholder="Describe the image to make, or the edit to apply to the selected ones",
                                 layout=w.Layout(width="100%", height="70px"))
        self.generate = w.Button(description="Generate", button_style="primary", icon="magic")
        self.edit = w.Button(description="Edit selected", icon="pencil", disabled=True,
                             layout=w.Layout(width="170px"),
                             tooltip="Send the selected image(s) as edit inputs with the prompt")
        self.cancel = w.Button(description="Cancel", icon="stop", button_style="warning", disabled=True)
        self.status = w.HTML()
        self.error = w.HTML()
        self.partial = w.Image(format="png", layout=w.Layout(max_width="384px", display="none"))
        self.result = w.Image(format="png", layout=w.Layout(max_width="512px", display="none"))
        self.caption = w.HTML()
        self.gallery_title = w.HTML()
        self.refresh = w.Button(description="", icon="refresh", tooltip="Reload the history",
                                layout=w.Layout(width="40px"))
        self.prev_page = w.Button(description="", icon="chevron-left", tooltip="Newer", layout=w.Layout(width="40px"))
        self.next_page = w.Button(description="", icon="chevron-right", tooltip="Older",
                                  layout=w.Layout(width="40px"))
        self.page_label = w.Label()
        self.clear_selection = w.Button(description="Clear selection", layout=w.Layout(width="130px"))
        self.selection_label = w.Label()
        self.tiles = [_Tile(self._on_tile) for _ in range(per_page)]
        self.grid = w.GridBox([t.box for t in self.tiles],
                              layout=w.Layout(grid_template_columns="repeat(auto-fill, 144px)", width="100%"))
        self.save_path = w.Text(placeholder="path/to/file.png or a folder/", description="Save to",
                                layout=w.Layout(width="420px"))
        self.save = w.Button(description="Save", icon="save",
                             tooltip="Write the full image (the selected ones, else the last result)")

        for name in ("prompt", "generate", "edit", "cancel", "status", "error", "partial", "result", "caption",
                     "gallery_title", "refresh", "prev_page", "next_page", "page_label", "clear_selection",
                     "selection_label", "grid", "save_path", "save", "summary"):
            getattr(self, name).add_class(f"nbi-{name.replace('_', '-')}")

        self.settings: ProviderPanel | None = ProviderPanel(self.session) if settings else None
        parts: list[w.Widget] = [w.HTML("<b>nbimagine studio</b>"), self.summary]
        if self.settings is not None:
            accordion = w.Accordion(children=[self.settings.widget], selected_index=None)
            accordion.set_title(0, "Provider settings")
            accordion.add_class("nbi-settings")
            parts.append(accordion)
        parts += [
            self.prompt,
            w.HBox([self.generate, self.edit, self.cancel, self.status]),
            self.error,
            w.HBox([self.partial, self.result]),
            self.caption,
            w.HBox([self.gallery_title, self.refresh, self.prev_page, self.page_label, self.next_page,
                    self.clear_selection, self.selection_label]),
            self.grid,
            w.HBox([self.save_path, self.save]),
        ]
        self.widget = w.VBox(parts)
        self.widget.add_class("nbi-studio")

        self.generate.on_click(lambda _: self.start())
        self.edit.on_click(lambda _: self.start(edit=True))
        self.cancel.on_click(lambda _: self.stop())
        self.refresh.on_click(lambda _: self.show_page(self.page))
        self.prev_page.on_click(lambda _: self.show_page(self.page - 1))
        self.next_page.on_click(lambda _: self.show_page(self.page + 1))
        self.clear_selection.on_click(lambda _: self.set_selection([]))
        self.save.on_click(lambda _: self.save_selected())
        self.session.observe(self._on_session, names=list(self.session.trait_names()))
        self._render_summary()
        self.show_page(0)

    # --- display -----------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<Studio history={self.history!r} running={self.running}>"

    def close(self) -> None:
        """Cancel a running generation, stop following the session, close the widgets."""
        self.stop()
        self.session.unobserve(self._on_session, names=list(self.session.trait_names()))
        if self.settings is not None:
            self.settings.close()
        _close_tree(self.widget)

    @property
    def running(self) -> bool:
        """True from Generate until the result (or error) is shown."""
        return self._running

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no generation runs (True) or ``timeout`` passes (False).

        For scripts and tests: in a kernel, updates are delivered on the main thread, so do not
        call this from a cell while the studio is running.
        """
        return self._idle.wait(timeout)

    # --- thread hand-off ---------------------------------------------------------------------------

    def _dispatch(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the studio's own thread (see :class:`_UIThread`)."""
        self._ui.call(fn, *args)

    # --- generation --------------------------------------------------------------------------------

    def start(self, edit: bool = False) -> Generation | None:
        """What Generate (``edit=False``) and Edit selected (``edit=True``) do. None if refused."""
        from ._generate import Generation

        with self._lock:
            if self.running:
                return None
            prompt = self.prompt.value.strip()
            if not prompt:
                self._set_error("Write a prompt first: describe the image"
                                + (" edit." if edit else "."))
                return None
            edits: list[BinaryResult] = []
            try:
                if edit:
                    if not self.selected:
                        self._set_error("Select one or more images in the gallery first, then Edit selected.")
                        return None
                    edits = [self.history.get(i).image for i in self.selected]
                generation = Generation(prompt, edits=edits, session=self.session, history=self.history)
                generation.start(on_event=self._on_event)
            except Exception as exc:
                self._set_error(plain_error(exc))
                return None
            self.generation = generation
            self._running = True
            self._idle.clear()
            self._started_at = time.perf_counter()
            self._set_error("")
            self.last_error = None
            self.partial.value = b""
            _show(self.partial, False)
            self._update_buttons()
            self._what = f"Editing {', '.join(f'#{i}' for i in self.selected)}" if edit else "Generating"
            self._tick()
            self._ticker = threading.Thread(target=self._tick_loop, args=(generation,), daemon=True,
                                            name="nbimagine-studio-ticker")
            self._ticker.start()
            assert generation.job is not None
            generation.job.future.add_done_callback(lambda _f: self._dispatch(self._finish, generation))
            return generation

    def stop(self) -> None:
        """What Cancel does: abort the running requests."""
        generation = self.generation
        if generation is not None and self.running:
            generation.cancel()

    def _tick_loop(self, generation: Generation) -> None:
        while self.generation is generation and self.running:
            time.sleep(0.2)
            if self.generation is generation and self.running:
                self._dispatch(self._tick)

    def _tick(self) -> None:
        if self.running:
            elapsed = time.perf_counter() - self._started_at
            self.status.value = f'<span class="nbi-running">{self._what}… {elapsed:.1f} s</span>'

    def _on_event(self, index: int, event: StreamEvent) -> None:
        # Called on the background loop's thread: hand over, never touch widgets here.
        from .events import PartialImageEvent

        if isinstance(event, PartialImageEvent):
            self._dispatch(self._show_partial, event.index, event.image)

    def _show_partial(self, index: int, image: BinaryResult) -> None:
        if not self.running:
            return
        try:
            data, media_type = _preview(image, PREVIEW_SIDE // 2)
        except ImagineError:  # a broken partial image: the final one may still be fine
            return
        self.partial.format = media_type.split("/")[-1]
        self.partial.value = data
        _show(self.partial, True)
        self.caption.value = f'<span class="nbi-partial-note">partial image {index + 1}</span>'

    def _finish(self, generation: Generation) -> None:
        if generation is not self.generation:
            return
        elapsed = generation.elapsed or (time.perf_counter() - self._started_at)
        job = generation.job
        cancelled = job is not None and job.future.cancelled()
        errors = [e for e in generation.errors if e is not None]
        entries = generation.entries
        _show(self.partial, False)
        self.partial.value = b""
        if cancelled:
            self.status.value = f'<span class="nbi-cancelled">Cancelled after {elapsed:.1f} s.</span>'
            self.caption.value = ""
        elif errors:
            self.status.value = f'<span class="nbi-failed">Failed after {elapsed:.1f} s.</span>'
            self._set_error(plain_error(errors[0]))
        else:
            self.status.value = f'<span class="nbi-done">Done in {elapsed:.1f} s.</span>'
        images = [image for index in range(generation.n) for image in generation.images(index)]
        if entries:
            self.last_entries = entries
            self._show_result(entries[0].image, elapsed, len(images), entry=entries[0])
        elif images:  # not recorded (the history failed, or no history): still the user's images
            self._show_result(images[0], elapsed, len(images))
        if generation.warnings:
            self._set_error(" ".join(generation.warnings))
        elif not images and not cancelled and not errors:
            texts = [r.body for r in generation.replies if r is not None and r.body]
            message = "The model answered without an image"
            self._set_error(message + (f": {texts[0][:300]}" if texts else "."))
        self._running = False
        try:
            self._update_buttons()
            self._render_summary()  # the budget left
            self.show_page(0)
        finally:
            self._idle.set()

    def _show_result(self, image: BinaryResult, elapsed: float, count: int, entry: HistoryEntry | None = None
                     ) -> None:
        from ._display import caption_for

        try:
            data, media_type = _preview(image, PREVIEW_SIDE)
        except ImagineError as exc:  # kept and named, not previewed
            _show(self.result, False)
            self._set_error(f"No preview: {exc}")
        else:
            self.result.format = media_type.split("/")[-1]
            self.result.value = data
            _show(self.result, True)
        caption = caption_for(image, history_id=entry.id if entry else None, elapsed=elapsed,
                              provider=entry.provider if entry else None, model=entry.model if entry else None)
        lines = caption.split("\n")
        extra = []
        if entry is not None and entry.parents:
            extra.append("edited from " + ", ".join(f"#{p}" for p in entry.parents))
        if count > 1:
            extra.append(f"+{count - 1} more in the gallery")
        head = " · ".join([lines[0], *extra])
        prompt = " ".join((entry.prompt if entry else self.generation.prompt if self.generation else "").split())
        self.caption.value = (
            f'<div class="nbi-result-caption"><div>{html.escape(head)}</div>'
            f'<div style="color:#555">{html.escape(prompt[:300])}</div>'
            + "".join(f'<div style="color:#555">{html.escape(line)}</div>' for line in lines[1:])
            + "</div>"
        )

    def _set_error(self, message: str) -> None:
        self.last_error = message or None
        self.error.value = _error_html(message)

    def _update_buttons(self) -> None:
        running = self.running
        self.generate.disabled = running
        self.cancel.disabled = not running
        self.edit.disabled = running or not self.selected
        self.edit.description = f"Edit selected ({len(self.selected)})" if self.selected else "Edit selected"

    # --- gallery -------------------------------------------------------------------------------------

    def show_page(self, page: int) -> None:
        """Show gallery page ``page`` (0 = newest), clamped to the pages there are."""
        total = len(self.history)
        pages = max(1, -(-total // self.per_page))
        page = min(max(page, 0), pages - 1)
        entries = self.history.page(page, self.per_page)
        self.page = page
        chosen = set(self.selected)
        for i, tile in enumerate(self.tiles):
            tile.show(entries[i] if i < len(entries) else None, entries[i].id in chosen if i < len(entries)
                      else False)
        self.gallery_title.value = f"<b>History</b>&nbsp;({total:,} image{'s' if total != 1 else ''})"
        self.page_label.value = f"page {page + 1} of {pages}"
        self.prev_page.disabled = page == 0
        self.next_page.disabled = page >= pages - 1
        self._render_selection()

    def set_selection(self, ids: Sequence[int]) -> None:
        """Select these history ids (replacing the selection)."""
        self.selected = list(dict.fromkeys(int(i) for i in ids))
        chosen = set(self.selected)
        for tile in self.tiles:
            if tile.entry_id is not None:
                tile._loading = True
                try:
                    tile.select.value = tile.entry_id in chosen
                    tile.select.button_style = "info" if tile.entry_id in chosen else ""
                finally:
                    tile._loading = False
        self._render_selection()

    def _on_tile(self, tile: _Tile, selected: bool) -> None:
        assert tile.entry_id is not None
        if selected and tile.entry_id not in self.selected:
            self.selected.append(tile.entry_id)
        elif not selected and tile.entry_id in self.selected:
            self.selected.remove(tile.entry_id)
        self._render_selection()

    def _render_selection(self) -> None:
        ids = ", ".join(f"#{i}" for i in self.selected)
        self.selection_label.value = f"selected: {ids}" if ids else "nothing selected"
        self.clear_selection.disabled = not self.selected
        self._update_buttons()

    # --- saving ------------------------------------------------------------------------------------

    def save_selected(self, path: str | None = None) -> list[Path]:
        """What Save does: write the full selected image(s), else the last result, to ``path``."""
        target = (path if path is not None else self.save_path.value).strip()
        ids = list(self.selected) or [e.id for e in self.last_entries[:1]]
        if not ids:
            self._set_error("Nothing to save: select an image in the gallery (or generate one) first.")
            return []
        if not target:
            self._set_error("Type where to save: a file such as out/cat.png, or a folder ending in /.")
            return []
        if len(ids) > 1 and not (target.endswith(("/", "\\")) or Path(target).expanduser().is_dir()):
            self._set_error(f"{len(ids)} images are selected: give a folder (ending in /) to save them all, "
                            "or select one image.")
            return []
        written: list[Path] = []
        try:
            for entry_id in ids:
                # Never replaces a file: a taken name is an error shown here (a folder gets a free name).
                written.append(self.history.get(entry_id).image.save(target, overwrite=False).resolve())
        except Exception as exc:
            self._set_error(plain_error(exc))
            return written
        self._set_error("")
        self.status.value = ('<span class="nbi-saved">Saved '
                             + html.escape(", ".join(f"#{i} to {p}" for i, p in zip(ids, written, strict=True)))
                             + "</span>")
        return written

    # --- session -----------------------------------------------------------------------------------

    def _on_session(self, change: dict[str, Any]) -> None:
        self._dispatch(self._render_summary)

    def _render_summary(self) -> None:
        summary = f'<span class="nbi-summary-text">{html.escape(self.session.summary())}</span>'
        self.summary.value = summary + self._budget_html()

    def _budget_html(self) -> str:
        """What is left of the notebook's and the session's budgets (%imagine budget), when set."""
        from ._generate import budget_lines

        if self.session.budget_usd is None and self.history.budget_usd is None:
            return ""
        lines = budget_lines(self.session, self.history)
        return f'<div class="nbi-budget">{"<br/>".join(html.escape(line) for line in lines)}</div>'


def _preview(image: BinaryResult, max_side: int) -> tuple[bytes, str]:
    """Bytes small enough to send to the browser, and their media type."""
    from ._display import preview

    return preview(image, max_side=max_side)


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

