"""``%%imagine`` and ``%imagine``: image generation as a notebook cell.

Loading must stay cheap (``%load_ext nbimagine`` adds well under 100 ms): this module imports
IPython pieces that are already loaded, traitlets and the plain config classes. The SDKs, Pillow,
the history and the generation runner load on first use.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import queue
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, HasTraits, TraitError, Unicode, dlink, observe, validate

from ._cost import format_usd
from ._options import FAMILY_LABELS, IMAGE_CONFIG, SETTINGS, option
from ._options import OPTIONS as TABLE
from ._session import NO_AGENT, OPTIONS, PROVIDERS, ImagineSession, credentials_advice, get_session, option_trait
from .errors import BudgetError, ConfigError, ImagineError, InputError, SetInterrupted

if TYPE_CHECKING:
    from ._generate import Generation
    from ._history import History, HistoryEntry
    from .events import BinaryResult

__all__ = ["ImagineMagics", "interpolate", "load_ipython_extension", "unload_ipython_extension"]

SUBCOMMANDS = ("use", "history", "show", "lineage", "export", "providers", "emulator", "panel", "studio", "mask",
               "budget", "cost", "jobs")
_SESSION_TRAITS = ("provider", *OPTIONS)
_HELP_FLAGS = {"-h", "--help"}
_NAME_RE = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PROGRESS_EVERY = 0.25  # seconds between elapsed-time refreshes of the progress slot


def _user_variables(shell: Any) -> dict[str, Any]:
    """The user's own names: IPython's (``In``, ``Out``, ``_``, ``exit``...) are not prompt variables."""
    if shell is None:
        return {}
    hidden = shell.user_ns_hidden
    return {k: v for k, v in shell.user_ns.items() if k not in hidden or hidden[k] is not v}


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` by ``str(namespace[name])`` when ``name`` is defined; leave every other brace.

    ``{{name}}`` is the escape for a literal ``{name}``. Never ``str.format``: prompts hold JSON and code.
    """

    def substitute(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped is not None:
            return "{" + escaped + "}"
        if name in namespace:
            return str(namespace[name])
        return match.group(0)

    return _NAME_RE.sub(substitute, text)


def _short_traceback(exc: BaseException) -> BaseException:
    # IPython renders an exception through its _render_traceback_ when present: a provider failure
    # then shows one line ("ProviderError: [openai, HTTP 429] ...") instead of 40 lines of internals.
    # The exception type and value are unchanged, so nbmake and `except` clauses see the real error.
    from ._display import printable

    line = printable(f"{type(exc).__name__}: {exc}")
    exc._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
    return exc


def _table_arguments(func: Any) -> Any:
    """``@argument`` for every row of the option table, in table order (one source for parser and help)."""
    for opt in reversed(TABLE):
        text = opt.help_text().replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": opt.name, "help": text, "metavar": opt.metavar}
        if opt.kind is int:
            kwargs["type"] = int
        elif opt.scope == "cell":  # a mode of this cell (--each): no session default to turn off
            kwargs = {"dest": opt.name, "help": text, "action": "store_true"}
        elif opt.kind is bool:  # --background-mode alone means on; "off" turns a session default off
            kwargs.update(nargs="?", const="on", choices=("on", "off"))
        func = argument(*opt.flags, **kwargs)(func)
    return func


# %config ImagineMagics.<option>: one configurable trait per table row, made from the same table.
_ConfigTraits = type("_ConfigTraits", (HasTraits,), {
    **{opt.name: option_trait(opt).tag(config=True) for opt in SETTINGS},
    "emulator": Bool(False, help="Route every provider to the in-process emulator.").tag(config=True),
})


@magics_class
class ImagineMagics(Magics, _ConfigTraits):
    """The ``%imagine`` magics. Its traits mirror the shared session, so ``%config`` works:
    ``%config ImagineMagics.provider = 'gemini'``."""

    provider = Unicode("openai", help=f"Default provider: {', '.join(PROVIDERS)} or a registered name."
                       ).tag(config=True)

    def __init__(self, shell: Any = None, session: ImagineSession | None = None, **kwargs: Any) -> None:
        self.session = session or get_session()
        self._syncing = True  # config values applied during __init__ go to the session below
        super().__init__(shell=shell, **kwargs)
        # Only what the user configured (ipython_config.py, %config before loading) overrides the session.
        section = self.config.get(type(self).__name__, {})
        configured = {name: getattr(self, name) for name in _SESSION_TRAITS if name in section}
        self._syncing = False
        if configured:
            try:
                self.session.use(any_provider=True, **configured)
            except ConfigError as exc:
                print(f"nbimagine: ignoring invalid ImagineMagics configuration: {exc}")
        # Session -> magics, so %config ImagineMagics shows what %imagine use set.
        self._links = [dlink((self.session, name), (self, name)) for name in _SESSION_TRAITS]

    # --- %config forwarding ----------------------------------------------------------------------

    @validate(*_SESSION_TRAITS)
    def _check_option(self, proposal: Any) -> Any:
        name, value = proposal["trait"].name, proposal["value"]
        if not self._syncing and getattr(self.session, name) != value:
            try:
                self.session.validate(any_provider=True, **{name: value})
            except ConfigError as exc:
                raise TraitError(str(exc)) from None
        return value

    @observe(*_SESSION_TRAITS)
    def _forward_option(self, change: Any) -> None:
        if not self._syncing and getattr(self.session, change["name"]) != change["new"]:
            self.session.use(any_provider=True, **{change["name"]: change["new"]})

    # --- the magic -------------------------------------------------------------------------------

    @magic_arguments()
    @argument("-p", "--provider", help=f"{', '.join(PROVIDERS)}, or a registered name")
    @_table_arguments
    @argument("-e", "--edit", action="append", default=[], metavar="REF",
              help="image to edit (repeatable): last, -2, #17, a variable (BinaryResult, Reply, bytes, "
                   "PIL image, path) or a file path")
    @argument("-r", "--ref", action="append", default=[], metavar="REF",
              help="reference image sent after the edited ones (repeatable; same forms as -e)")
    @argument("--mask", metavar="REF",
              help="mask for the first -e image: transparent (or, black-and-white, white) where it should "
                   "change; same forms as -e; paint one with %%imagine mask REF")
    @argument("-n", type=int, default=1, metavar="N",
              help="number of variants: concurrent requests (up to 8), or one request with the Images API "
                   "(openai-images, azure-images: up to 10)")
    @argument("-o", "--out", metavar="NAME", help="store the Reply (a list of Replies with -n) in NAME")
    @argument("--full", action="store_true", help="embed the full-resolution image instead of a preview")
    @argument("--no-history", action="store_true", help="do not record the images in the notebook history")
    @argument("--dry-run", action="store_true",
              help="show the cost estimate and the exact request (keys masked) without sending it")
    @argument("words", nargs="*", help="subcommand and its arguments, or a one-line prompt")
    @line_cell_magic
    def imagine(self, line: str, cell: str | None = None) -> Any:
        """Generate or edit images; the cell body is the prompt.

        ``{name}`` in the body is replaced by the value of ``name`` from the notebook namespace
        (other braces stay as they are; ``{{name}}`` gives a literal ``{name}``). On the magic line
        IPython's own expansion applies, as for every magic.

        Line-magic subcommands::

            %imagine use PROVIDER [options]   set session defaults (%imagine use alone shows them)
            %imagine history [N]              gallery of this notebook's last N images with their ids
            %imagine history --all [N]        the same across every notebook of the folder
            %imagine history --notebook NAME  name this notebook's history (when it cannot be detected)
            %imagine history --merge NAME     move notebook NAME's images into this notebook's history
            %imagine history --repair         rebuild a lost or damaged history index from its records
            %imagine history --root DIR       keep the history in DIR/.nbimagine (e.g. a read-only folder)
            %imagine show ID [--full]         one image from the history (ID: last, -2, #17)
            %imagine lineage ID               the chain of edits that led to an image
            %imagine export DIR [N] [--force] copy full-resolution images + history.json to DIR
            %imagine providers                which providers are configured, which keys are set
            %imagine emulator on|off          route every provider to the offline emulator
            %imagine budget [USD|off] [--session]  this notebook's (or session's) spending limit
            %imagine cost                     this notebook's spending by day, provider and model
            %imagine mask REF [-o NAME]       paint a mask over an image (then %%imagine -e REF --mask NAME)
            %imagine jobs                     batch jobs of this notebook (also after a restart)
            %imagine jobs wait|status|cancel|results [ID]   follow one job (ID: last by default)
            %imagine emulator faults          the emulator's faults; ... fault NAME arms one
            %imagine panel | studio           widget panels
            %imagine PROMPT...                generate from a one-line prompt

        Examples::

            %%imagine -p gemini --aspect 16:9 -n 4
            A watercolor fox in the snow, in the style of {style}

            %%imagine --each --concurrency 8 -o catalogue
            A red teapot on white
            A blue teapot on white
        """
        if _HELP_FLAGS & set(line.split()):
            # IPython's argument parser has no -h; %imagine? shows the same text.
            print(self.imagine.__doc__)
            return None
        if cell is None:
            # "%imagine history;" shows nothing, as IPython's ``;`` does. Not IPython's
            # @output_can_be_silenced: it tokenizes the line or cell as Python after the magic ran, so a
            # prompt such as "a sad smiley :(" (on Python 3.12+ also "a cat's hat") raised a TokenError
            # traceback after its images had been generated and shown.
            silenced = line.rstrip().endswith(";")
            line = line.rstrip().removesuffix(";")
            # A plain split: a one-line prompt may hold an apostrophe ("a cat's hat"), which shlex rejects.
            first, _, rest = line.strip().partition(" ")
            if first in SUBCOMMANDS:
                shown = self._subcommand(first, rest.strip())
                return None if silenced else shown
        args = self._parse(line, one_line_prompt=cell is None)
        if cell is None:
            prompt = " ".join(args.words)
            if not prompt.strip():
                raise UsageError("Write a prompt: %%imagine on the first line of a cell with the prompt below, "
                                 "or %imagine PROMPT; %imagine? lists the subcommands")
        else:
            if args.words:
                raise UsageError(f"Unexpected {' '.join(args.words)!r} on the %%imagine line: the prompt goes "
                                 "in the cell body, options start with - (see %%imagine?)")
            # IPython has already expanded {name} on the magic line, never in the body: only the body
            # is interpolated here (a second pass over the line would undo IPython's {{ escape).
            prompt = interpolate(cell, _user_variables(self.shell))
        for opt in TABLE:  # what the table says about options that need or exclude others on the line
            refusal = opt.refusal(vars(args)) if getattr(args, opt.name) not in (None, False) else None
            if refusal:
                raise UsageError(refusal)
        if args.each or args.batch:
            self._generate_set(prompt, args)
        else:
            self._generate(prompt.strip(), args)
        return None

    # --- generation ------------------------------------------------------------------------------

    def _parse(self, line: str, *, one_line_prompt: bool = False) -> Any:
        try:
            args = parse_argstring(self.imagine, line)
        except UsageError as exc:
            hint = ("; a one-line prompt that starts with - goes after --: %imagine -- -PROMPT"
                    if one_line_prompt and "unrecognized arguments" in str(exc) else "")
            raise UsageError(f"{exc} (see %%imagine? for the options{hint})") from None
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(f"Cannot parse the %%imagine line: {exc}") from None
        # IPython splits magic lines without removing quotes (non-POSIX shlex, so that Windows paths keep
        # their backslashes): `-m "gpt-4.1"` would be the model '"gpt-4.1"'. Option values lose one pair of
        # quotes around them, as in a shell; the words of a one-line prompt stay as typed.
        for name, value in vars(args).items():
            if name != "words":
                setattr(args, name, [_unquote(v) for v in value] if isinstance(value, list) else _unquote(value))
        return args

    @staticmethod
    def _overrides(args: Any) -> dict[str, Any]:
        names = ("provider", *(opt.name for opt in SETTINGS))
        return {name: getattr(args, name) for name in names if getattr(args, name) is not None}

    def _generate(self, prompt: str, args: Any) -> None:
        from ._generate import Generation, variant_limit

        if args.out and not (args.out.isidentifier() and not keyword.iskeyword(args.out)):
            raise UsageError(f"-o needs a variable name, not {args.out!r}")
        overrides = self._overrides(args)
        record = not args.no_history
        try:
            self.session.validate(**overrides)
            limit = variant_limit(self.session, overrides.get("provider"))
            if not 1 <= args.n <= limit:
                raise UsageError(f"-n takes 1 to {limit} variants, not {args.n}")
            history = self._history() if (record or args.edit or args.ref or args.mask) else None
            edits, refs, mask, parents = self._inputs(args, history)
            gen = Generation(prompt, edits=edits, refs=refs, mask=mask, parents=parents, n=args.n,
                             overrides=overrides, record=record, session=self.session, history=history)
            gen.build_agent()
        except (ConfigError, InputError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:  # before any request: nothing to stop, nothing recorded; one line
            raise _short_traceback(KeyboardInterrupt("Cancelled before the request was sent")) from None
        try:  # before the progress slot: a missing key is a one-line UsageError and nothing else
            gen.check_credentials()
        except ConfigError as exc:
            raise UsageError(credentials_advice(self.session, gen.provider, exc)) from None
        if args.dry_run:
            try:
                self._dry_run(gen)
            except (ConfigError, InputError) as exc:
                raise UsageError(str(exc)) from None
            return
        try:
            gen.hold_budget()  # refused here, before the progress slot and any request
        except (ConfigError, InputError, BudgetError) as exc:
            raise UsageError(str(exc)) from None
        self._run_with_progress(gen, full=args.full, out=args.out)

    def _dry_run(self, gen: Generation, count: int = 1, *, batch: bool = False) -> None:
        """``--dry-run``: the estimate, the budgets and the exact first request; nothing is sent or recorded.
        ``count``: an image set of that many prompts like ``gen`` (its longest); ``batch``: sent as a batch job
        (estimated, and checked against the budgets, at the batch price)."""
        from IPython.display import display

        from ._cost import batch_estimate

        agent = gen.build_agent()
        mask = {"mask": gen.mask} if gen.mask is not None else {}
        dry = agent.dry_run(*gen._inputs(), refs=gen.refs, n=gen.n * count, stream=count == 1, **mask)
        notes = []
        if batch:
            dry.estimate = batch_estimate(dry.estimate)
            notes.append("Sent as a batch job: billed at half the price; the estimate and the budgets count that.")
        notes += [s.problem(dry.estimate) or f"Within the {s.scope} budget of {format_usd(s.budget)} "
                  f"({format_usd(s.spent)} spent" + (f", {s.held_text()})." if s.held_text() else ").")
                  for s in gen.budgets()]
        display(_DryRunView(dry, gen.n * count, notes, each="one per prompt and variant" if count > 1 else ""))

    def _inputs(self, args: Any, history: Any) -> tuple[list[BinaryResult], list[BinaryResult],
                                                        BinaryResult | None, list[int]]:
        """The images of ``-e``, ``-r`` and ``--mask`` (resolved in the history), and their parent ids."""
        parents: list[int] = []

        def resolve(refs: list[str]) -> list[BinaryResult]:
            images = []
            for ref in refs:
                image, parent = self._resolve_ref(ref, history)
                images.append(image)
                if parent is not None:
                    parents.append(parent)
            return images

        edits, refs = resolve(args.edit), resolve(args.ref)
        if args.mask and not edits:
            raise UsageError("--mask needs the image it applies to: add -e REF (the mask marks the region of "
                             "that image to change)")
        mask = self._resolve_ref(args.mask, history)[0] if args.mask else None
        return edits, refs, mask, parents

    def _generate_set(self, text: str, args: Any) -> None:
        """``--each`` / ``--batch``: one prompt per non-blank line."""
        from ._generate import MAX_VARIANTS
        from ._many import ManyRun, as_prompts, prepare_agent, run_with_progress

        lines = [line for line in text.splitlines() if line.strip().lstrip("\ufeff").strip()]
        if not lines:
            raise UsageError("Write the prompts in the cell body, one per line")
        try:
            prompts = as_prompts(lines)  # the same checks as generate_many's (a lone surrogate...)
        except (ConfigError, InputError) as exc:
            raise UsageError(str(exc)) from None
        if not 1 <= args.n <= MAX_VARIANTS:
            raise UsageError(f"-n takes 1 to {MAX_VARIANTS} variants, not {args.n}")
        if args.out and not (args.out.isidentifier() and not keyword.iskeyword(args.out)):
            raise UsageError(f"-o needs a variable name, not {args.out!r}")
        overrides = self._overrides(args)
        record = not args.no_history
        try:
            self.session.validate(**overrides)
            agent, params = prepare_agent(None, (), overrides, self.session, check=False)
        except (ConfigError, InputError) as exc:
            raise UsageError(str(exc)) from None
        try:  # a missing key is one line before anything else, not one error per prompt
            agent._provider.check_credentials()
        except ConfigError as exc:
            provider = overrides.get("provider") or self.session.provider
            raise UsageError(credentials_advice(self.session, provider, exc)) from None
        try:
            if args.dry_run:
                from ._generate import Generation

                longest = max(prompts, key=len)
                gen = Generation(longest, n=args.n, overrides=overrides, record=False, session=self.session,
                                 agent=agent, params=params)
                self._dry_run(gen, count=len(prompts), batch=args.batch)
                return
            if args.batch:
                from ._batch import submit_batch

                job = submit_batch(prompts, n=args.n, history=self._history(), **overrides)
                if args.out:
                    self.shell.user_ns[args.out] = job
                from IPython.display import display

                display(_JobSubmitted(job), raw=False)
                return
            history = self._history() if (record or args.edit or args.ref or args.mask) else None
            edits, refs, mask, parents = self._inputs(args, history)
            # The line's values, else the session's (%imagine use --concurrency 8, the panel, %config).
            concurrency = overrides.get("concurrency", self.session.concurrency)
            rate_limit = overrides.get("rate_limit", self.session.rate_limit)
            run = ManyRun(prompts, agent=agent, params=params, n=args.n, overrides=overrides, record=record,
                          history=history, concurrency=concurrency, rate_limit=rate_limit,
                          edits=edits, refs=refs, mask=mask, parents=parents,
                          retries=overrides.get("max_retries", self.session.options().get("max_retries")))
            run.hold_budget()  # refused here, before the progress bar and any request
        except (ConfigError, InputError, BudgetError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:  # before any request: nothing to stop, nothing recorded; one line
            raise _short_traceback(KeyboardInterrupt("Cancelled before the request was sent")) from None
        from IPython.display import display

        try:
            images = run_with_progress(run, progress=True)
        except SetInterrupted as stopped:
            if args.out:
                self.shell.user_ns[args.out] = stopped.results
            display(stopped.results)
            raise _short_traceback(stopped) from None
        if args.out:
            self.shell.user_ns[args.out] = images
        display(images)
        if images.failures:
            from .errors import ProviderError

            kept = f"; the {len(images.ok)} that worked are in the history" + (f" and in {args.out}" if args.out
                                                                               else "")
            raise _short_traceback(ProviderError(
                f"{len(images.failures)} of {len(images)} prompt(s) failed (listed above){kept}", code="image_set"))

    def _run_with_progress(self, gen: Generation, *, full: bool, out: str | None = None) -> list[Any]:
        """Run ``gen`` with a live progress slot, then show every image it has, whatever happened.

        Frontends that apply display updates (JupyterLab, Notebook, VS Code) see one slot updated in
        place with the elapsed time and partial images; the final images always come as new
        ``display_data`` outputs, so frontends that ignore updates (qtconsole, euporie) show them
        too, and a plain terminal prints one progress line and one caption per image.
        """
        import signal
        import threading

        from IPython.display import display

        from ._display import progress_bundle, progress_preview

        events: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        partials: list[Any] = [None] * gen.n
        status = ["waiting"] * gen.n
        job_status: list[str | None] = [None] * gen.n  # a background response's own status
        texts = [""] * gen.n
        problems: list[str] = []  # one line each, shown beside the images
        label = f"Generating with {gen.provider}/{gen.model}" + (" (emulator)" if self.session.emulator else "")
        live = _applies_updates(self.shell)
        last_refresh = time.perf_counter()

        def on_poll() -> None:
            # Progress is a courtesy: whatever goes wrong in it (a malformed event, a frontend error)
            # is one warning line at the end, and the request goes on to its final images.
            try:
                poll()
            except Exception as exc:
                problem = f"the progress display failed ({type(exc).__name__}: {exc})"
                if problem not in problems:
                    problems.append(problem)

        def poll() -> None:
            changed = False
            # The callback runs on the loop thread; the display is only touched here, on the main thread.
            while True:
                try:
                    index, event = events.get_nowait()
                except queue.Empty:
                    break
                kind = type(event).__name__
                if kind == "PartialImageEvent":
                    try:
                        partials[index] = progress_preview(event.image)
                    except ImagineError as exc:  # a broken partial: the final image may still be fine
                        problems.append(f"a partial image was skipped: {exc}")
                        continue
                    status[index] = f"partial {_ordinal(event.index)}"
                    refresh()  # every partial image is shown, even when several arrive between polls
                    changed = False
                    continue
                if kind == "TextDeltaEvent":
                    texts[index] += event.text
                    status[index] = "writing"
                elif kind == "StatusEvent":
                    job_status[index] = event.status.replace("_", " ")
                    if event.detail:
                        job_status[index] += f" ({event.detail})"
                    status[index] = event.status.replace("_", " ")
                elif kind == "ReplyEvent":
                    status[index] = "done"
                elif kind == "Retrying":  # the SDK backs off before trying again: say so, not "Generating…"
                    status[index] = str(event)
                    refresh()  # shown even when the retry succeeds before the next poll
                    changed = False
                    continue
                changed = True
            if changed or time.perf_counter() - last_refresh >= _PROGRESS_EVERY:
                refresh()

        def refresh() -> None:
            nonlocal last_refresh
            last_refresh = time.perf_counter()
            shown = partials if (gen.n > 1 or partials[0] is not None) else ()
            states = [s for s in job_status if s]
            line = label + (f" · background response {', '.join(dict.fromkeys(states))}" if states else "")
            retrying = next((s for s in status if s.startswith("retrying")), None)
            bundle = progress_bundle(gen.elapsed, label=line, partials=shown, status=status, note=retrying)
            if texts[0] and gen.n == 1:
                from ._display import _text_html, clip

                text = clip(texts[0], 2000)
                bundle["text/plain"] += "\n" + text
                bundle["text/html"] = _text_html(text) + bundle["text/html"]
            handle.update(bundle, raw=True)

        # Once every request has ended, a Ctrl-C can stop nothing any more: it must not hide the images
        # either. This handler (main thread only, where signals land) defers such a late Ctrl-C.
        late_interrupts: list[float] = []
        finishing = False  # past the wait: the requests have ended (or were stopped) and are being shown

        def on_sigint(signum: int, frame: Any) -> None:
            if finishing or (gen.job is not None and gen.job.done()):
                late_interrupts.append(gen.elapsed)
                return
            raise KeyboardInterrupt

        # Installed before the request starts: a Ctrl-C between the start and the wait (while the progress
        # slot is drawn) would otherwise leave the request running unseen, its images never shown.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            try:
                gen.start(on_event=lambda i, e: events.put((i, e)))
            except (ConfigError, InputError) as exc:
                raise UsageError(str(exc)) from None
            except KeyboardInterrupt:
                gen.cancel()  # a job started just before the interrupt stops too
                raise _short_traceback(KeyboardInterrupt("Cancelled before the request was sent")) from None
            error: ImagineError | None = None
            interrupted = False
            handle = None
            try:
                try:
                    handle = display(progress_bundle(None, label=label), raw=True, display_id=True)
                except Exception as exc:  # a frontend that fails: the request goes on, the images follow
                    problems.append(f"the progress display failed ({type(exc).__name__}: {exc})")
                gen.wait(on_poll=on_poll if live and handle is not None else None, warn=False)
            except KeyboardInterrupt:
                interrupted = True
                gen.cancel()  # stops the requests and waits for them (a no-op when Job.result already did)
            except ImagineError as exc:
                error = exc
            finishing = True
            replies = self._finish(gen, handle, full=full, out=out, problems=problems,
                                   interrupted=interrupted, late=[] if interrupted else late_interrupts)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        stopped = gen.stopped
        if interrupted and stopped:
            made = sum(len(gen.images(i)) for i in range(gen.n))
            kept = (f"; the {made} image(s) that had arrived are shown above" if made else
                    "; nothing was recorded")
            raise _short_traceback(KeyboardInterrupt(
                f"Cancelled after {gen.elapsed:.1f} s (Ctrl-C): {stopped} request(s) stopped{kept}"))
        if error is not None:
            if isinstance(error, (ConfigError, InputError)):
                raise UsageError(str(error)) from None
            raise _short_traceback(error) from None
        return replies

    def _finish(self, gen: Generation, handle: Any, *, full: bool, out: str | None, problems: list[str],
                interrupted: bool, late: list[float]) -> list[Any]:
        """Bind ``-o``, then show every image the generation has, its text, and one line per problem.

        Nothing here raises because of an image or the history: a preview that cannot be made
        names the image instead, and every failure is a warning line beside the images.
        """
        from IPython.display import display

        from ._agent import Reply
        from ._display import MAX_SIDE, caption_for, caption_output, image_output, text_output, warning_output
        from ._images import human_bytes

        replies: list[Any] = []
        items: list[BinaryResult] = []
        for index in range(gen.n):
            images = gen.images(index)
            reply = gen.replies[index]
            if reply is None and images:  # a failure or a Ctrl-C after some images had arrived
                reason = "cancelled" if gen.errors[index] is None else "error"
                reply = Reply(files=images, finish_reason=reason, provider=gen.provider, model=gen.model)
            if reply is not None:
                replies.append(reply)
            items.extend(images)
        if out and replies:
            self.shell.user_ns[out] = replies[0] if gen.n == 1 else replies
        problems = [*problems, *gen.warnings]
        if interrupted and gen.stopped and items:
            problems.append(f"Ctrl-C after {gen.elapsed:.1f} s stopped {gen.stopped} request(s); the images "
                            "below had already arrived" + (" and are recorded" if gen.entries else ""))
        texts = list(dict.fromkeys(r.body for r in gen.replies if r is not None and r.body))
        stops = []  # an answer that stopped short without an image says why (the provider's reason)
        for reply in gen.replies:
            if reply is not None and not reply.files and reply.finish_reason not in (None, "STOP", "completed"):
                why = f": {reply.finish_message}" if reply.finish_message else ""
                stops.append(f"No image ({reply.finish_reason}){why}")
        texts += stops
        side = MAX_SIDE if len(items) == 1 else 512
        width = None if len(items) == 1 else 384
        outputs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        if texts:
            outputs.append((text_output("\n\n".join(texts), where="the reply's .body"), {}))
        def one(image: BinaryResult) -> tuple[dict[str, Any], dict[str, Any], Any]:
            try:
                caption = caption_for(image, elapsed=gen.elapsed, provider=gen.provider, model=gen.model,
                                      parents=gen.parents)
                return image_output(image, caption, full=full, max_side=side, width=width)
            except Exception as exc:  # anything else about one image (its metadata...): named, not raised
                return {"text/plain": f"{_ref(image)} ({human_bytes(len(image.data))})"}, {}, \
                    f"{type(exc).__name__}: {exc}"

        if len(items) > 1:  # Pillow releases the GIL while decoding and encoding: previews in parallel
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(len(items), 4)) as pool:
                made = list(pool.map(one, items))
        else:
            made = [one(image) for image in items]
        for image, (data, metadata, problem) in zip(items, made, strict=True):
            if problem is not None:
                where = self._where(gen, image)
                data["text/plain"] += f"\n{where}"
                problems.append(f"no preview of {_ref(image)}: {problem}. {where}")
            outputs.append((data, metadata))
            outputs.append((caption_output(data["text/plain"], width=width), {}))
        if not items and not texts and not interrupted and not any(gen.errors):
            outputs.append((text_output("The model answered with no image and no text."), {}))
        elif not items and not interrupted and not any(gen.errors) and not stops:
            problems.append(self._no_image_hint(gen))  # the model chose text; a stop above already says why
        if late:
            problems.append(f"Ctrl-C at {late[0]:.1f} s came after the request had finished; nothing was "
                            "stopped and the images are all here")
        if problems:
            outputs.append((warning_output(list(dict.fromkeys(problems))), {}))
        # A frontend or publisher failure: each output is tried on its own (one that fails does not take
        # the images with it), -o is bound already, and one line says where the images are.
        failed: list[str] = []
        if handle is not None and _applies_updates(self.shell):
            try:
                handle.update(_note(_summary(gen, len(items), interrupted)), raw=True)
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
        for data, metadata in outputs:
            try:
                display(data, metadata=metadata, raw=True)
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
        if failed:
            where = " and ".join(w for w in (f"in {out}" if out and replies else "",
                                              "in the history (%imagine history)" if gen.entries else "") if w)
            with contextlib.suppress(Exception):
                print(f"ImagineWarning: {len(failed)} output(s) could not be displayed ({failed[0]})"
                      + (f"; the images are {where}." if where else "."))
        return replies

    def _no_image_hint(self, gen: Generation) -> str:
        """Why a reply may hold text but no image, and what to change, for the provider it came from."""
        try:
            family = self.session.kind(gen.provider)
        except ConfigError:
            family = gen.provider
        if family == "foundry" and gen.model.startswith("agent "):
            agent = gen.model.removeprefix("agent ")
            return (f"No image: agent {agent!r} answered with text only. It may have no image generation tool: "
                    f"give it one in Foundry, or %imagine use foundry --agent {agent} -m DEPLOYMENT so that "
                    "nbimagine makes a version with the image tool")
        if family in IMAGE_CONFIG:
            return ("No image: the model answered with text only; ask for a picture explicitly, and keep IMAGE in "
                    "--modalities")
        return "No image: the model answered with text only; ask for a picture explicitly"

    @staticmethod
    def _where(gen: Generation, image: BinaryResult) -> str:
        entry = next((e for e in gen.entries if e.id == image.metadata.get("history_id")), None)
        path = getattr(entry, "path", None)
        if entry is not None:
            return f"Kept as #{entry.id}" + (f" ({path})" if path else "") + "."
        return "Not in the history; it is on the result (-o) as bytes."

    # --- references ------------------------------------------------------------------------------

    def _history(self) -> History:
        from ._history import history
        from .errors import HistoryError

        try:
            h = history()
        except HistoryError as exc:
            raise UsageError(str(exc)) from None
        moved = _moved_away(h)
        if moved and moved not in _NOTED:
            _NOTED.add(moved)
            print(moved)
        if h.identity is not None and not h.identity.known and h.notebook not in _NOTED:
            # Said once per kernel: the cell must tell where its images go when the notebook is unknown.
            _NOTED.add(h.notebook)
            print(f"nbimagine cannot tell which notebook this is, so its images go to a history of their own, "
                  f"{h.notebook!r}, in {h.path}. To use this notebook's history: %imagine history --notebook NAME "
                  "(its file name without .ipynb).")
        return h

    def _resolve_ref(self, ref: str, history: History | None) -> tuple[BinaryResult, int | None]:
        """An image for ``-e REF`` and its history id (for lineage) when it has one."""
        from .errors import HistoryError

        entry = self._history_ref(ref, history)
        if entry is not None:
            try:
                return entry.image, entry.id
            except HistoryError as exc:
                raise UsageError(f"{ref}: {exc}") from None
        ns = self.shell.user_ns if self.shell else {}
        if ref.isidentifier() and ref in ns:
            value = ns[ref]
            image = _to_image(value, ref)
            return image, image.metadata.get("history_id")
        path = Path(ref).expanduser()
        if path.is_file():
            return _bytes_image(_read_file(path), str(path)), None
        raise UsageError(f"Unknown image reference {ref!r}: use last, -2, #17 (a history id), the name of a "
                         "variable holding an image, or an existing file path")

    def _history_ref(self, ref: str, history: History | None, *, say_where: bool = True) -> HistoryEntry | None:
        """The entry ``ref`` names (``last``, ``-2``, ``#17``), None when ``ref`` is no such reference.
        ``say_where``: print a line when the image is another notebook's (the caller does not show it)."""
        from .errors import HistoryError

        ref = ref.strip()
        if not re.fullmatch(r"last|-\d+|#\d+", ref):
            return None
        if re.fullmatch(r"-0+", ref):
            raise UsageError(f"{ref} is not a position: -1 (or last) is the newest image, -2 the one before")
        if history is None:  # not `history or ...`: that runs a query to ask whether it is empty
            history = self._history()
        try:
            entry = history.resolve(ref)
        except IndexError:
            raise UsageError(f"{ref}: the history of notebook {history.notebook!r} has only {len(history)} "
                             f"image(s); %imagine history lists them.{_elsewhere(history)}") from None
        except KeyError as exc:
            raise UsageError(f"{ref}: {exc.args[0]}; %imagine history lists the ids") from None
        except HistoryError as exc:
            raise UsageError(str(exc)) from None
        if ref.startswith("#") and entry.id != int(ref[1:]):
            print(f"{ref} in {history.notebook!r} is the image now numbered #{entry.id} "
                  "(ids became unique per folder; the old number still works in this notebook)")
        elif say_where and history.notebook is not None and entry.notebook not in (None, history.notebook):
            print(f"{ref} is an image of notebook {entry.notebook!r}, not of this one ({history.notebook!r}).")
        return entry

    # --- subcommands -----------------------------------------------------------------------------

    def _subcommand(self, name: str, rest: str) -> Any:
        handler = getattr(self, f"_cmd_{name}")
        try:
            return handler(rest)
        except (ConfigError, InputError) as exc:
            raise UsageError(str(exc)) from None

    def _cmd_use(self, rest: str) -> Any:
        args = self._parse(rest)
        if len(args.words) > 1 or (args.words and args.provider):
            given = [*args.words, *([args.provider] if args.provider else [])]
            raise UsageError(f"%imagine use takes one provider name, not {' '.join(given)!r}")
        extras = [flag for flag, given in (("-e", args.edit), ("-r", args.ref), ("--mask", args.mask),
                                            ("-n", args.n != 1), ("-o", args.out),
                                            ("--full", args.full), ("--no-history", args.no_history),
                                            ("--dry-run", args.dry_run),
                                            *((opt.flag, getattr(args, opt.name)) for opt in TABLE
                                              if opt.scope == "cell")) if given]
        if extras:
            raise UsageError(f"{', '.join(extras)} {'apply' if len(extras) > 1 else 'applies'} to one generation, "
                             "not to %imagine use")
        overrides = self._overrides(args)
        provider = args.words[0] if args.words else overrides.pop("provider", None)
        if provider is not None or overrides:
            self.session.use(provider, **overrides)
        return _Settings(self.session)

    def _cmd_history(self, rest: str) -> Any:
        from ._history import history, repair_history, set_history_root, set_notebook
        from .errors import HistoryError

        words = _split(rest)
        options: dict[str, Any] = {"--all": False, "--repair": False, "--notebook": None, "--root": None,
                                   "--merge": None}
        count = None
        while words:
            word = words.pop(0)
            if word in ("--all", "--repair"):
                options[word] = True
            elif word in ("--notebook", "--root", "--merge"):
                if not words or words[0].startswith("--"):
                    example, what, arg = (("~/images", "a folder", "DIR") if word == "--root"
                                          else ("02_editing", "the notebook's name", "NAME"))
                    raise UsageError(f"%imagine history {word} {arg}: give {what}, e.g. {example}")
                options[word] = words.pop(0)
            elif word.isdigit() and count is None:
                count = int(word)
            else:
                raise UsageError(f"%imagine history takes a number of images, --all, --notebook NAME, --merge NAME, "
                                 f"--repair or --root DIR, not {word!r}")
        try:
            if options["--root"]:
                # Name the folder where the kernel's working directory does not suit (read-only, shared).
                set_history_root(options["--root"])
            if options["--notebook"]:
                # Name the notebook where the kernel cannot tell (nbmake, plain kernels, some IDEs).
                set_notebook(options["--notebook"])
            if options["--repair"]:
                print(repair_history())
            h = history(all_notebooks=True) if options["--all"] else self._history()
            if options["--merge"]:
                if h.notebook is None:
                    raise UsageError("%imagine history --merge NAME moves images into this notebook, not into --all")
                moved = h.merge(options["--merge"])
                print(f"Moved {moved} image(s) of {options['--merge']!r} into the history of {h.notebook!r}.")
            entries = h.latest(12 if count is None else count)
            total = len(h)
        except ValueError as exc:
            raise UsageError(f"%imagine history --notebook: {exc}") from None
        except KeyError as exc:
            raise UsageError(f"%imagine history --merge: {exc.args[0]}; %imagine history --all lists them") from None
        except HistoryError as exc:
            raise UsageError(str(exc)) from None
        note = _elsewhere(h) if not total and h.notebook is not None else ""
        return _Gallery(entries, total=total, notebook=h.notebook, note=note.strip(), folder=str(h.path))

    def _cmd_show(self, rest: str) -> Any:
        words = _split(rest)
        full = "--full" in words
        words = [w for w in words if w != "--full"]
        if len(words) != 1:
            raise UsageError("%imagine show takes one image: last, -2 or #17 (add --full for full resolution)")
        ref = words[0] if not words[0].isdigit() else f"#{words[0]}"
        history = self._history()
        entry = self._history_ref(ref, history, say_where=False)
        if entry is None:
            raise UsageError(f"Unknown history reference {words[0]!r}: use last, -2 or #17")
        return _Shown(entry, full=full, here=history.notebook)

    def _cmd_lineage(self, rest: str) -> Any:
        words = _split(rest)
        ref = (words[0] if not words[0].isdigit() else f"#{words[0]}") if len(words) == 1 else ""
        entry = self._history_ref(ref, None, say_where=False) if ref else None
        if entry is None:
            raise UsageError("%imagine lineage takes one image: last, -2 or #17")
        chain = self._history().lineage(entry.id)
        return _Gallery(chain, total=len(chain), notebook=None, title=f"Lineage of #{entry.id}, oldest first")

    def _cmd_export(self, rest: str) -> Any:
        from .errors import HistoryError

        words = _split(rest)
        force = "--force" in words
        words = [w for w in words if w != "--force"]
        if not words or len(words) > 2:
            raise UsageError("%imagine export DIR [N] [--force]: copy the history's full-resolution images to DIR "
                             "(--force replaces files of the same name)")
        history = self._history()
        entries = None
        if len(words) == 2:
            if not words[1].isdigit():
                raise UsageError(f"%imagine export DIR N: N is a number of images, not {words[1]!r}")
            entries = list(reversed(history.latest(int(words[1]))))
        try:
            written = history.export(words[0], entries, overwrite=force)
        except HistoryError as exc:
            raise UsageError(str(exc)) from None
        print(f"Exported {len(written) - 1} image(s) and {written[-1].name} to {written[-1].parent}")
        return None

    def _cmd_providers(self, rest: str) -> Any:
        _no_arguments("providers", rest, "it lists every provider; %imagine use PROVIDER chooses one")
        return _Providers(self.session)

    def _cmd_emulator(self, rest: str) -> Any:
        word, _, arguments = rest.strip().partition(" ")
        word = word.lower()
        if word == "faults":
            from ._session import emulator

            return _FaultList(emulator().state.pending_faults() if self.session.emulator else [])
        if word == "fault":
            return self._inject_fault(arguments)
        if word not in ("on", "off", ""):
            raise UsageError("%imagine emulator on|off|faults, or %imagine emulator fault NAME [--times N] "
                             "[--status NNN]")
        if word:
            self.session.use(emulator=word == "on")
        if self.session.emulator:
            _emulator_banner()
        else:
            print("nbimagine emulator off: requests go to the real provider APIs.")
        return None

    def _cmd_budget(self, rest: str) -> Any:
        words = _split(rest)
        session = "--session" in words
        words = [w for w in words if w != "--session"]
        if len(words) > 1:
            raise UsageError("%imagine budget [USD|off] [--session]: e.g. %imagine budget 2.00")
        if words:
            from ._budget import changed

            usd = _amount(words[0])
            if session:
                self.session.budget_usd = usd
            else:
                self._history().set_budget(usd)
            changed()
        return _BudgetView(self.session, self._history())

    def _cmd_cost(self, rest: str) -> Any:
        if rest.strip():
            raise UsageError("%imagine cost takes no arguments (nbimagine.history().cost() gives the data)")
        return self._history().cost()

    def _cmd_jobs(self, rest: str) -> Any:
        from ._batch import BatchJob

        words = _split(rest)
        action = words.pop(0) if words and words[0] in ("list", "wait", "status", "cancel", "results") else "list"
        history = self._history()
        if action == "list":
            if words:
                raise UsageError(f"%imagine jobs takes no argument, not {' '.join(words)!r} (wait ID, status ID...)")
            return _JobsTable(history.jobs(), notebook=history.notebook)
        if len(words) > 1:
            raise UsageError(f"%imagine jobs {action} takes one job id (or a unique start of one), or none for the "
                             "last job")
        try:
            job = BatchJob(history.job(words[0] if words else "last"), history=history)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        from .errors import BatchError, ImagineError

        try:
            if action == "status":
                return _JobStatus(job, job.status())
            if action == "cancel":
                return _JobStatus(job, job.cancel())
            images = job.wait() if action == "wait" else job.results()
        except KeyboardInterrupt:
            print(f"Stopped waiting; batch job {job.id} goes on at the provider: %imagine jobs wait {job.id} resumes.")
            raise
        except BatchError as exc:
            from IPython.display import display

            display(exc.results)
            raise _short_traceback(exc) from None
        except (ConfigError, InputError) as exc:
            raise UsageError(str(exc)) from None
        except ImagineError as exc:
            raise _short_traceback(exc) from None
        return images

    def _inject_fault(self, arguments: str) -> None:
        import argparse

        from .emulator import UnknownFaultError
        from .emulator._faults import FAMILIES

        parser = argparse.ArgumentParser(prog="%imagine emulator fault", add_help=False, exit_on_error=False)
        parser.add_argument("name")
        parser.add_argument("--times", type=int, default=1)
        parser.add_argument("--status", type=int)
        parser.add_argument("--family", choices=FAMILIES)
        try:
            args = parser.parse_args(_split(arguments))
        except (argparse.ArgumentError, SystemExit):
            raise UsageError("%imagine emulator fault NAME [--times N] [--status NNN] "
                             f"[--family {'|'.join(FAMILIES)}]; %imagine emulator faults lists the names") from None
        if not self.session.emulator:
            raise UsageError("The emulator is off: %imagine emulator on first (faults exist only offline)")
        from ._session import emulator

        try:
            emulator().inject(args.name, times=args.times, status=args.status, family=args.family)
        except (UnknownFaultError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        from .emulator._faults import ROUTES, parse_fault

        prefix, _, rest = args.name.partition(":")
        kind, _ = parse_fault(rest if prefix in FAMILIES else args.name)
        runs = "the next request" if args.times == 1 else f"the next {args.times} requests"
        # A fault waits for a request of a route that acts on it: say which, or the user waits for nothing.
        print(f"Emulator fault {args.name!r} armed for {runs} of {'; '.join(ROUTES[r][1] for r in kind.routes)}.")

    def _cmd_panel(self, rest: str) -> Any:
        _no_arguments("panel", rest, "set options with %imagine use PROVIDER --OPTION VALUE")
        from ._widgets import panel

        return panel()

    def _cmd_mask(self, rest: str) -> Any:
        """``%imagine mask REF [-o NAME]``: a painter over image REF, bound to NAME (default ``mask``)."""
        words = _split(rest)
        name = "mask"
        if "-o" in words:
            at = words.index("-o")
            if at + 1 >= len(words):
                raise UsageError("%imagine mask REF -o NAME: give the variable name after -o")
            name = words[at + 1]
            del words[at : at + 2]
        if len(words) != 1:
            raise UsageError("%imagine mask takes one image: last, -2, #17, a variable or a file path "
                             "(then %%imagine -e REF --mask mask)")
        if not (name.isidentifier() and not keyword.iskeyword(name)):
            raise UsageError(f"-o needs a variable name, not {name!r}")
        from ._painter import MaskPainter

        image, history_id = self._resolve_ref(words[0], None)
        if history_id is not None and image.metadata.get("history_id") is None:
            from .events import BinaryResult

            image = BinaryResult(image.data, {**image.metadata, "history_id": history_id})
        try:
            painter = MaskPainter(image, label=f"#{history_id}" if history_id else words[0])
        except InputError as exc:
            raise UsageError(str(exc)) from None
        if self.shell is not None:
            self.shell.user_ns[name] = painter
        print(f"Paint the region to change, then: %%imagine -e {words[0]} --mask {name}")
        return painter

    def _cmd_studio(self, rest: str) -> Any:
        _no_arguments("studio", rest, "set options with %imagine use PROVIDER --OPTION VALUE")
        from ._widgets import studio

        return studio()


# --- helpers ---------------------------------------------------------------------------------------

_NOTED: set[str | None] = set()  # unknown-notebook histories (and moves) already named in a cell


def _moved_away(history: History) -> str | None:
    """What to say when the server puts this notebook in another folder than its history's (it was moved
    while its kernel ran): the history stays where the kernel started, and a kernel started in the new
    folder would not find it. None when they agree, or when the history's folder was chosen (--root)."""
    from . import _history

    identity = history.identity
    if (identity is None or identity.directory is None or identity.source != "server"
            or _history._root is not None):
        return None
    try:
        if identity.directory.resolve() == history.root:
            return None
    except OSError:
        return None
    return (f"This notebook is now in {identity.directory}, but its images are kept in {history.path} (the "
            "folder its kernel started in; a moved notebook's history stays there). After reopening it from its "
            f"new folder, run %imagine history --root {history.root} to use this history again.")


def _elsewhere(history: History) -> str:
    """A hint naming the folder's other notebooks that have images (where a user's images may be)."""
    others = {n: c for n, c in history.notebooks().items() if n != history.notebook}
    if not others:
        return ""
    listed = ", ".join(f"{n!r} ({c})" for n, c in list(others.items())[:5]) + (", …" if len(others) > 5 else "")
    return (f" Other notebooks in this folder have images: {listed}; %imagine history --all shows them; "
            "--merge NAME moves one's images into this notebook; --notebook NAME uses its history instead.")


def _no_arguments(name: str, rest: str, hint: str) -> None:
    if rest.strip():
        raise UsageError(f"%imagine {name} takes no arguments, not {rest.strip()!r}: {hint}")


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"Cannot parse {text!r}: {exc}") from None


def _read_file(path: Path) -> bytes:
    from .events import read_image_file

    try:
        return read_image_file(path)  # its size is checked before a byte is read
    except InputError as exc:
        raise UsageError(str(exc)) from None


def _bytes_image(data: bytes, where: str) -> BinaryResult:
    from ._images import sniff_media_type
    from .events import BinaryResult

    if sniff_media_type(data) is None:
        raise UsageError(f"{where} is not a PNG, JPEG, WebP or GIF image")
    return BinaryResult(data)


def _to_image(value: Any, name: str) -> BinaryResult:
    from .events import BinaryResult

    if isinstance(value, BinaryResult):
        return value
    kind = type(value).__name__
    if kind == "HistoryEntry":
        return value.image
    if kind == "MaskPainter":
        if value.mask is None:
            raise UsageError(f"{name} is a mask painter with nothing painted yet: paint the region to change first")
        return value.mask
    if kind == "Reply":
        if not value.files:
            raise UsageError(f"{name} is a Reply without images; use one that has files")
        return value.files[-1]
    if isinstance(value, (bytes, bytearray, memoryview)):
        from ._images import human_bytes
        from .events import MAX_INPUT_BYTES

        size = memoryview(value).nbytes
        if size > MAX_INPUT_BYTES:  # said before a copy is made
            raise UsageError(f"{name} holds {human_bytes(size)}; an input image may be at most "
                             f"{human_bytes(MAX_INPUT_BYTES)}")
        return _bytes_image(bytes(value), name)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"{name} holds the path {str(path)!r}, which is not a file")
        return _bytes_image(_read_file(path), str(path))
    if type(value).__module__.startswith("PIL."):
        import io

        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return BinaryResult(buffer.getvalue())
    raise UsageError(f"{name} is a {kind}; -e takes a BinaryResult, Reply, bytes, PIL image or path")


def _applies_updates(shell: Any) -> bool:
    """Whether the frontend redraws a display in place. IPython's own terminal publisher prints every
    update as a new line (17 progress lines for one image), so a terminal only gets the first state."""
    from IPython.core.displaypub import DisplayPublisher

    return shell is not None and type(shell.display_pub) is not DisplayPublisher


def _ordinal(index: Any) -> str:
    return str(index + 1) if isinstance(index, int) and not isinstance(index, bool) else "image"


def _ref(image: BinaryResult) -> str:
    history_id = image.metadata.get("history_id")
    return f"#{history_id}" if history_id is not None else "an image"


def _summary(gen: Generation, count: int, interrupted: bool) -> str:
    verb = "Stopped" if interrupted and gen.stopped else "Failed" if any(gen.errors) else "Done"
    images = f"{count} image{'s' if count != 1 else ''} below" if count else "no image"
    return f"{verb} after {gen.elapsed:.1f} s with {gen.provider}/{gen.model}: {images}."


def _amount(text: str) -> float | None:
    from ._budget import budget_amount

    try:
        return budget_amount(text)
    except ConfigError as exc:
        raise UsageError(f"%imagine budget: {exc}") from None


class _BudgetView:
    """``%imagine budget``: the notebook's and the session's budget, spending and what is left."""

    def __init__(self, session: ImagineSession, history: History) -> None:
        from ._budget import budget_lines

        self.lines = budget_lines(session, history)

    def __repr__(self) -> str:
        return "\n".join(self.lines)


class _DryRunView:
    """``%%imagine --dry-run``: estimate, budget notes and the request, as text and HTML."""

    def __init__(self, dry: Any, n: int, notes: list[str], each: str = "") -> None:
        self.dry, self.n, self.notes, self.each = dry, n, notes, each or "one per variant"

    def __repr__(self) -> str:
        import json

        request = json.dumps(self.dry.request, indent=2, ensure_ascii=False)
        times = f" (x{self.n}, {self.each})" if self.n > 1 else ""
        lines = [f"Dry run, nothing sent. Estimate: {self.dry.estimate}",
                 *(f"  - {a}" for a in self.dry.estimate.assumptions), *self.notes,
                 f"Request{times}:", request]
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import html

        text = repr(self)
        head, _, request = text.partition("\nRequest")
        return {"text/plain": text,
                "text/html": f"<pre style='white-space:pre-wrap'>{html.escape(head)}</pre>"
                             f"<details><summary>Request{html.escape(request.splitlines()[0])}</summary>"
                             f"<pre>{html.escape(chr(10).join(request.splitlines()[1:]))}</pre></details>"}


def _note(text: str) -> dict[str, Any]:
    import html

    return {"text/plain": text, "text/html": f'<div style="font-family:monospace">{html.escape(text)}</div>'}


def _emulator_banner() -> None:
    from IPython.display import display

    detail = ("every provider is answered by an offline emulator on 127.0.0.1. "
              "Images are placeholders drawn from the prompt; no API key is used and nothing is billed. "
              "Costs shown are what the real service would charge, marked simulated.")
    text = f"nbimagine emulator ON: {detail}"
    display({"text/plain": "⚠ " + text,
             "text/html": '<div style="background:#fff3cd;color:#664d03;border:1px solid #ffda6a;'
                          f'padding:6px 10px;border-radius:4px">⚠ <b>nbimagine emulator ON</b>: {detail}</div>'},
            raw=True)


class _FaultList:
    """What ``%imagine emulator faults`` shows: every fault the emulator can inject, described."""

    def __init__(self, pending: list[tuple[str, str | None, int]]) -> None:
        from .emulator import fault_kinds

        self.kinds = fault_kinds()
        self.pending = pending  # armed and not yet taken: (name, family or None, times left)

    def _armed(self) -> str:
        if not self.pending:
            return ""
        return "Armed, waiting for a request they apply to: " + ", ".join(
            f"{name}{f' ({family})' if family else ''} x{left}" for name, family, left in self.pending)

    def __repr__(self) -> str:
        lines = ["Emulator faults (%imagine emulator fault NAME, or [fault:NAME] in a prompt):"]
        lines += [f"  {k.usage():28} {'/'.join(k.routes):30} {k.description}" for k in self.kinds]
        return "\n".join([*lines, *filter(None, [self._armed()])])

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><td><code>{html.escape(k.usage())}</code></td><td>{', '.join(k.routes)}</td>"
                       f"<td style='text-align:left'>{html.escape(k.description)}</td></tr>" for k in self.kinds)
        return ("<p>Emulator faults: <code>%imagine emulator fault NAME</code>, or <code>[fault:NAME]</code> in a "
                f"prompt.</p><table><tr><th>fault</th><th>routes</th><th>what it does</th></tr>{rows}</table>"
                + (f"<p>{html.escape(self._armed())}</p>" if self.pending else ""))


class _Settings:
    """What ``%imagine use`` shows: the provider, model and every option that provider takes, then the
    values kept for other providers (inactive: not sent)."""

    def __init__(self, session: ImagineSession) -> None:
        self.provider = session.provider
        self.family = session.kind()
        self.model = session.effective_model()
        self.default_model = not session.model
        self.emulator = session.emulator
        self.active = session.active_options()
        self.inactive = session.inactive_options()

    def lines(self) -> tuple[str, list[tuple[str, str]], str]:
        model = f"{self.model} (default)" if self.default_model else self.model
        if not self.model:  # Foundry before --agent: nothing to name yet
            model = NO_AGENT
        head = f"imagine defaults: {self.provider} · {model}" + (" · emulator on" if self.emulator else "")
        rows = [(name, option(name).show(value)) for name, value in self.active.items() if name != "model"]
        kept = ""
        if self.inactive:
            owners = sorted({option(name).owner for name in self.inactive})
            label = FAMILY_LABELS.get(self.family, self.family)
            kept = (f"inactive with {label} (kept for {' and '.join(owners)}): "
                    + ", ".join(f"{name}={option(name).show(value)}" for name, value in self.inactive.items()))
        return head, rows, kept

    def __repr__(self) -> str:
        head, rows, kept = self.lines()
        text = head + "\n  " + "  ".join(f"{name}={value}" for name, value in rows)
        return text + (f"\n  {kept}" if kept else "")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import html

        head, rows, kept = self.lines()
        cells = "".join(f'<div><span style="opacity:0.7">{html.escape(name)}</span> {html.escape(value)}</div>'
                        for name, value in rows)
        body = (f'<div class="nbi-settings-view"><b>{html.escape(head)}</b>'
                '<div style="display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:2px 16px;'
                f'margin:4px 0">{cells}</div>')
        if kept:
            body += f'<div class="nbi-inactive" style="color:#777">{html.escape(kept)}</div>'
        return {"text/plain": repr(self), "text/html": body + "</div>"}


class _Gallery:
    """Thumbnails with ids and prompts (``%imagine history``, ``%imagine lineage``)."""

    def __init__(self, entries: list[HistoryEntry], *, total: int, notebook: str | None,
                 title: str | None = None, note: str = "", folder: str | None = None) -> None:
        self.entries, self.total, self.notebook, self.note = entries, total, notebook, note
        # No notebook: the whole folder (--all) or a lineage, where each entry's notebook is shown.
        self.all = notebook is None
        if title is None:
            where = f"History of {notebook!r}" if notebook is not None else f"All notebooks in {folder}"
            title = f"{where}: {len(entries)} of {total} image(s), newest first"
        self.title = title

    def _label(self, e: HistoryEntry) -> str:
        return f"[{e.notebook}] " if self.all and e.notebook else ""

    def __repr__(self) -> str:
        lines = [self.title, *([self.note] if self.note else [])]
        lines += [f"  #{e.id}  {e.width}x{e.height}  {self._label(e)}{_clip(e.prompt, 70)}" for e in self.entries]
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        import base64
        import html

        from ._history import output_ids
        from ._images import sniff_media_type
        from .errors import HistoryError, ImageDecodeError

        cells = []
        for e in self.entries:
            try:
                thumb = e.thumbnail(160)
                media = sniff_media_type(thumb)
                img = (f'<img src="data:{media};base64,{base64.b64encode(thumb).decode()}" '
                       'style="max-width:160px;max-height:160px;display:block"/>')
            except ImageDecodeError:  # kept bytes that cannot be previewed (truncated, a bomb, not an image)
                img = '<div style="width:160px;height:40px">(no preview)</div>'
            except (OSError, ValueError, HistoryError):  # a missing or unreadable file still lists the entry
                img = '<div style="width:160px;height:40px">(file missing)</div>'
            parents = f" ← {', '.join(f'#{p}' for p in e.parents)}" if e.parents else ""
            cells.append(f'<figure style="margin:0;width:160px">{img}<figcaption style="font-size:0.8em">'
                         f'<b>#{e.id}</b>{html.escape(parents)} {html.escape(self._label(e) + _clip(e.prompt, 60))}'
                         "</figcaption></figure>")
        note = f"<div>{html.escape(self.note)}</div>" if self.note else ""
        body = (f"<div><b>{html.escape(self.title)}</b></div>{note}"
                '<div style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(cells) + "</div>")
        metadata = {"nbimagine": {"images": [output_ids(e.id, e.sha256, e.ext) for e in self.entries]}}
        return {"text/plain": repr(self), "text/html": body}, metadata


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Shown:
    """One history entry, shown like a fresh result (``%imagine show``)."""

    def __init__(self, entry: HistoryEntry, *, full: bool, here: str | None = None) -> None:
        self.entry, self.full, self.here = entry, full, here

    def __repr__(self) -> str:
        return self.entry.caption + self._elsewhere()

    def _elsewhere(self) -> str:
        # Ids are unique in the folder, so #N may be another notebook's image: say so under it.
        if self.here is None or self.entry.notebook in (None, self.here):
            return ""
        return f"\nfrom notebook {self.entry.notebook!r}, not this one ({self.here!r})"

    def _caption(self) -> str:
        from ._display import caption_for

        caption = caption_for(self.entry.image, provider=self.entry.provider, model=self.entry.model,
                              parents=self.entry.parents)
        return caption + f"\nprompt: {_clip(self.entry.prompt, 200)}" + self._elsewhere()

    def _ids(self) -> dict[str, Any]:
        from ._history import output_ids

        return {"nbimagine": output_ids(self.entry.id, self.entry.sha256, self.entry.ext)}

    def _ipython_display_(self) -> None:
        # Like a fresh result: the image, then its caption (one line each) as an output of its own.
        from IPython.display import display

        from ._display import caption_output, image_output

        data, metadata, _ = image_output(self.entry.image, self._caption(), full=self.full)
        display(data, metadata={**metadata, **self._ids()}, raw=True)
        display(caption_output(self._caption()), raw=True)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        from ._display import image_bundle

        return image_bundle(self.entry.image, caption=self._caption(), full=self.full), self._ids()


class _JobSubmitted:
    """What ``%%imagine --batch`` shows: the job id, at once, and how to follow it."""

    def __init__(self, job: Any) -> None:
        self.job = job

    def __repr__(self) -> str:
        job = self.job
        return (f"Batch job {job.id} submitted: {job.record.total} request(s) to {job.record.provider}/"
                f"{job.record.model} ({job.last or job.record.state}). It runs at the provider (up to 24 h, about "
                f"half price); %imagine jobs wait {job.id} collects the images, also after a kernel restart.")


class _JobStatus:
    def __init__(self, job: Any, status: Any) -> None:
        self.job, self.status = job, status

    def __repr__(self) -> str:
        errors = f" ({'; '.join(self.status.errors)})" if self.status.errors else ""
        return f"Batch job {self.job.id} ({self.job.record.provider}/{self.job.record.model}): {self.status}{errors}"


class _JobsTable:
    """``%imagine jobs``: this notebook's batch jobs, newest first."""

    def __init__(self, records: list[Any], *, notebook: str) -> None:
        self.records, self.notebook = records, notebook

    def rows(self) -> list[tuple[str, ...]]:
        return [(r.job_id or r.id, f"{r.provider}/{r.model}", r.state, f"{r.done + r.failed}/{r.total}",
                 str(r.failed), r.created_at.strftime("%Y-%m-%d %H:%M")) for r in self.records]

    def __repr__(self) -> str:
        if not self.records:
            return f"No batch jobs in the history of {self.notebook!r} (%%imagine --batch submits one)."
        head = ("job", "provider/model", "state", "collected", "failed", "created (UTC)")
        rows = [head, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import html

        if not self.records:
            return {"text/plain": repr(self), "text/html": f"<div>{html.escape(repr(self))}</div>"}
        head = "".join(f"<th>{h}</th>" for h in ("job", "provider/model", "state", "collected", "failed",
                                                  "created (UTC)"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        return {"text/plain": repr(self), "text/html": f"<table><tr>{head}</tr>{body}</table>"}


class _Providers:
    """``%imagine providers``: configured providers and which key variables are set, never their values."""

    def __init__(self, session: ImagineSession) -> None:
        self.status = session.key_status()
        self.sources = session.key_sources()
        self.current = session.provider
        self.emulator = session.emulator

    def rows(self) -> list[tuple[str, str, str]]:
        from ._session import foundry_credential_sources

        rows = []
        signed_in = bool(foundry_credential_sources())
        for name, ok in self.status.items():
            state = "emulator" if self.emulator else ("ready" if ok else "no key")
            if state == "ready" and name == "foundry" and not signed_in:
                # An endpoint alone is not enough: the token comes from an Entra ID sign-in nbimagine sees no
                # trace of here (no az/azd, no AZURE_* identity variables); DefaultAzureCredential may still
                # find one (VS Code, a token cache), so this is a warning, not a refusal.
                state = "sign in?"
            rows.append((("* " if name == self.current else "  ") + name, state,
                         ", ".join(self.sources.get(name, [])) or "-"))
        return rows

    def __repr__(self) -> str:
        width = max(12, *(len(n) for n, _, _ in self.rows()))
        lines = [f"{'provider':<{width}} {'status':<9} keys set (names only)"]
        lines += [f"{n:<{width}} {s:<9} {k}" for n, s, k in self.rows()]
        if self.emulator:
            lines.append("The emulator is on: every provider is answered offline.")
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        import html

        body = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(s)}</td><td>{html.escape(k)}</td></tr>"
                       for n, s, k in self.rows())
        note = "<p>The emulator is on: every provider is answered offline.</p>" if self.emulator else ""
        return {"text/plain": repr(self),
                "text/html": "<table><tr><th>provider</th><th>status</th><th>keys set (names only)</th></tr>"
                             f"{body}</table>{note}"}


# --- extension entry points ------------------------------------------------------------------------


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext nbimagine``: register ``%imagine`` / ``%%imagine``, and guard every ``Agent`` request of the
    kernel with the session's and the running notebook's budgets. Nothing heavy is imported."""
    from . import _budget

    magics = ImagineMagics(ip)
    ip.register_magics(magics)
    _budget.install(_kernel_scopes)
    if magics.session.emulator:
        _emulator_banner()


def _kernel_scopes() -> tuple[ImagineSession, Any]:
    """The session and the running notebook's history, whose budgets an ``Agent`` request is checked against
    (no notebook when its history cannot be opened: the session's budget still applies)."""
    from ._history import history

    try:
        notebook = history()
    except Exception:
        notebook = None
    return get_session(), notebook


def unload_ipython_extension(ip: Any) -> None:
    from . import _budget

    _budget.install(None)
    for kind in ("line", "cell"):
        ip.magics_manager.magics[kind].pop("imagine", None)
    found = ip.magics_manager.registry.pop("ImagineMagics", None)
    if found is not None:
        for link in getattr(found, "_links", []):
            link.unlink()
        if found in ip.configurables:
            ip.configurables.remove(found)
