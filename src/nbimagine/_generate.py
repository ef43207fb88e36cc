"""One generation request (or N concurrent variants), shared by ``%%imagine`` and the studio panel.

A :class:`Generation` builds its agent from the session on the caller's thread (so configuration
mistakes raise at once, before any request), then runs every variant on the ``_sync`` background
loop with ``asyncio.gather``: N variants take about as long as one call. Each final image is
recorded in the notebook's history (prompt, provider, model, params, parents), and its
``BinaryResult`` in the returned ``Reply`` is swapped for one whose metadata carries
``history_id``, so feeding it back in as an edit keeps the lineage.

The rule this module keeps: once a provider has answered, every image it returned is on
``replies`` (or on the error that ended the variant, or on ``arrived`` when Ctrl-C stopped the
stream after some images had come), and recording them can no longer fail the generation. A
history that is locked, read-only or full becomes a one-line message on ``warnings`` (emitted as
:class:`~nbimagine.errors.ImagineWarning` by :meth:`Generation.wait`); a cancellation that lands
while images are being recorded lets the recording finish, so ``entries`` is the truth about what
the history holds.

Threading: ``on_event(variant_index, event)`` is called **on the background loop's thread**. UI
code must be thread-safe there (e.g. put events in a ``queue.Queue`` and drain it from the main
thread, or use ``ipywidgets.Output.append_display_data``).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._budget import Holds, Standing, accounted
from ._image_models import MAX_N
from ._options import sent
from ._session import ImagineSession, get_session
from ._sync import Job
from .errors import ConfigError, ImagineWarning, ProviderError
from .events import BinaryResult, ImageEvent, ReplyEvent, StreamEvent

if TYPE_CHECKING:
    from ._agent import Agent, Reply
    from ._cost import Estimate
    from ._history import History, HistoryEntry
    from ._many import RateLimiter

__all__ = ["MAX_VARIANTS", "EventCallback", "Generation", "Retrying", "variant_limit"]

MAX_VARIANTS = 8  # requests at once for one cell; the Images API makes up to MAX_N images in one request
# Where a notebook user raises the retry count (the Python API's advice names max_retries).
MAGIC_RETRY_ADVICE = "add --retries 5 to the cell (or %imagine use --retries 5)"
MAGIC_OFFLINE = "run %imagine emulator on to work offline"


def variant_limit(session: ImagineSession, provider: str | None = None) -> int:
    """How many variants one generation may ask for: up to ``MAX_N`` from the Images API's one request,
    ``MAX_VARIANTS`` concurrent requests from the other providers."""
    return MAX_N if session.is_images_api(provider) else MAX_VARIANTS


@dataclass(frozen=True)
class Retrying:
    """Progress event: the SDK got HTTP ``status`` and retries, ``attempt`` of ``limit`` (after a back-off)."""

    status: int
    attempt: int
    limit: int

    def __str__(self) -> str:
        return f"retrying ({self.attempt}/{self.limit}) after HTTP {self.status}"


EventCallback = Callable[[int, "StreamEvent | Retrying"], None]


class Generation:
    """Generate ``n`` variants of ``prompt`` (optionally editing ``edits``) with the session's settings.

    ``overrides`` are session option names (``provider``, ``model``, ``size``, ``aspect_ratio``, ...)
    that apply to this request only. ``parents`` are history ids the result derives from; ids found
    in the edits' ``metadata["history_id"]`` are added automatically.

    ``refs`` are reference images sent after the edited ones; ``mask`` marks the region of the first
    edited image to change (checked, and converted if black-and-white, before any request). The mask
    is recorded in the history as an entry of its own (its parent: the image it was painted on) and
    is a parent of the results, so their lineage shows image and mask. With an Images API provider
    the ``n`` images come from one request (``n`` in the request), not from ``n`` requests.

    Many prompts (:func:`nbimagine.generate_many`) share one ``agent`` (with its ``params``, what the
    history records) and one ``limiter``, through which every request passes (rate limits, 429s).
    """

    def __init__(
        self,
        prompt: str,
        *,
        edits: Sequence[BinaryResult] = (),
        refs: Sequence[BinaryResult] = (),
        mask: BinaryResult | None = None,
        parents: Sequence[int] = (),
        n: int = 1,
        overrides: dict[str, Any] | None = None,
        record: bool = True,
        session: ImagineSession | None = None,
        history: History | None = None,
        retry_advice: str = MAGIC_RETRY_ADVICE,
        offline_advice: str = MAGIC_OFFLINE,
        agent: Agent | None = None,
        params: dict[str, Any] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"the number of variants must be an integer from 1 to {MAX_VARIANTS}, not {n!r}")
        if not prompt or not prompt.strip():
            raise ConfigError("the prompt is empty: write what to draw in the cell body")
        from ._agent import normalize_inputs

        self.prompt = prompt
        self.edits = list(edits)
        self.refs = list(refs)
        # InputError now, before any request (and before a progress slot): text that cannot be sent,
        # images too large or of a type no provider takes.
        normalize_inputs([prompt, *self.edits, *self.refs])
        self.mask = self._checked_mask(mask)
        ids = [*parents, *(e.metadata.get("history_id") for e in [*self.edits, *self.refs])]
        self.parents = list(dict.fromkeys(i for i in ids if isinstance(i, int)))
        self.overrides = dict(overrides or {})
        self.record = record
        self.retry_advice = retry_advice
        self.offline_advice = offline_advice
        self.session = session or get_session()
        self._history = history
        shared = agent is not None and params is not None
        self.provider = self.overrides.get("provider") or (
            type(agent.config).provider if shared else self.session.provider)
        self.model = agent.config.model if shared else self.session.effective_model(
            self.provider, self.overrides.get("model"))
        # The Images API makes n images in one request; other providers (and a shared agent, built once
        # for many prompts) make one per request.
        images_api = agent is None and self.session.is_images_api(self.provider)
        limit = MAX_N if images_api else MAX_VARIANTS
        if n > limit:
            raise ConfigError(f"the number of variants must be an integer from 1 to {limit}, not {n!r}"
                              + ("" if images_api else " (the Images API makes up to 10 in one request)"))
        self.per_call = n if images_api else 1
        n = 1 if self.per_call > 1 else n
        self.n = n
        self.limiter = limiter
        self.replies: list[Reply | None] = [None] * n
        self.errors: list[BaseException | None] = [None] * n
        self.variant_entries: list[list[HistoryEntry]] = [[] for _ in range(n)]
        # Finished images a stream delivered before its reply: kept when Ctrl-C stops the stream.
        self.arrived: list[list[BinaryResult]] = [[] for _ in range(n)]
        self.warnings: list[str] = []
        self._unrecorded: dict[str, tuple[int, int]] = {}  # history failure -> (images not recorded, its line)
        self.job: Job[list[Reply | None]] | None = None
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._agent: Agent | None = agent
        self._params: dict[str, Any] | None = params
        self._holds: Holds | None = None
        self._own_holds = False

    # --- public ----------------------------------------------------------------------------------

    @property
    def entries(self) -> list[HistoryEntry]:
        """History entries made so far, in variant order."""
        return [e for group in self.variant_entries for e in group]

    @property
    def elapsed(self) -> float:
        """Seconds since ``start`` (frozen once the generation ends)."""
        if self._started_at is None:
            return 0.0
        return (self._ended_at or time.perf_counter()) - self._started_at

    @property
    def params(self) -> dict[str, Any]:
        """The request parameters recorded in the history (only those that apply to the provider).

        Taken when the agent is built: the session may change (a panel, another thread) while the
        request runs, and the history must say what was sent.
        """
        if self._params is None:
            self._params = self._session_params()
        return dict(self._params)

    def _session_params(self) -> dict[str, Any]:
        options = {**self.session.options(), **self.overrides}
        params = {k: v for k, v in sent(options, self.session.kind(self.provider)).items()
                  if k not in ("model", "response_modalities") and v not in (None, 0)}
        if self.n * self.per_call > 1:
            params["n"] = self.n * self.per_call
        return params

    @property
    def history(self) -> History:
        if self._history is None:
            from ._history import history

            self._history = history()
        return self._history

    def build_agent(self) -> Agent:
        """The agent this generation uses (built once; raises ``ConfigError`` for bad settings)."""
        if self._agent is None:
            self._params = self._session_params()
            per_call = {"n": self.per_call} if self.per_call > 1 else {}
            self._agent = self.session.build_agent(provider=self.provider, **per_call, **{
                k: v for k, v in self.overrides.items() if k != "provider"})
        return self._agent

    def _checked_mask(self, mask: BinaryResult | None) -> BinaryResult | None:
        """The mask, checked against the first edited image now, on the caller's thread (converted from
        black-and-white if it was); ``InputError`` before anything is sent or recorded."""
        if mask is None:
            return None
        from ._masks import prepare_mask
        from .events import ImageInput

        target = ImageInput.from_result(self.edits[0]) if self.edits else None
        prepared = prepare_mask(ImageInput.from_result(mask), target)
        if prepared.converted is None:
            return mask
        assert prepared.input.data is not None
        return BinaryResult(prepared.input.data, {**mask.metadata, "mask_converted": prepared.converted})

    def _record_mask(self) -> None:
        """The mask goes into the history before the request, as an input the results descend from."""
        if self.mask is None or not self.record:
            return
        known = self.mask.metadata.get("history_id")
        if isinstance(known, int) and known in self.history:
            mask_id = known
        else:
            target = self.edits[0].metadata.get("history_id") if self.edits else None
            painted_on = target if isinstance(target, int) and target in self.history else None
            entry = self.history.add(self.mask, prompt=f"mask for #{painted_on}" if painted_on else "mask",
                                     provider="nbimagine", model="mask", params={"kind": "mask"},
                                     parents=[painted_on] if painted_on else [])
            mask_id = entry.id
            self.mask = _with_history_id(self.mask, mask_id)
        if mask_id not in self.parents:
            self.parents.append(mask_id)
        self._params = {**self.params, "mask": mask_id}

    def check_credentials(self) -> None:
        """Raise ``ConfigError`` naming what to set when the provider has no credentials (no network)."""
        self.build_agent()._provider.check_credentials()

    def _inputs(self) -> list[Any]:
        return [self.prompt, *self.edits]

    def estimate(self, count: int = 1, *, batch: bool = False) -> Estimate:
        """What this generation could cost (all its requests), before anything is sent; ``count``: that many
        generations like this one (an image set's prompts); ``batch``: sent as a batch job (half price)."""
        from ._cost import batch_estimate, estimate

        agent = self.build_agent()
        mask = [self.mask] if self.mask is not None else []
        found = estimate(agent.config, tools=agent.tools, n=self.n * count,
                         inputs=[*self._inputs(), *self.refs, *mask])
        return batch_estimate(found) if batch else found

    def budgets(self) -> list[Standing]:
        """Where each budget set stands: the notebook's (in its history) and the session's."""
        from ._budget import standings

        return standings(self.session, self._budget_history())

    def _budget_history(self) -> History | None:
        """The notebook whose budget applies: this generation's history (with ``record=False`` a history
        that cannot be opened means no notebook budget can be read, not an error)."""
        try:
            history = self.history
            history.budget_usd  # noqa: B018 - reading it is the check
        except Exception:
            if self.record:
                raise  # the history is needed anyway: its error says what is wrong
            return None
        return history

    def hold_budget(self, count: int = 1, *, job: str | None = None) -> Holds:
        """Check the budgets and hold this generation's estimated high end (all its requests), before any
        request: :class:`~nbimagine.errors.BudgetError` when it could take spending past one. ``start`` does
        it when it was not done before; the hold is given back request by request as each ends.

        ``count``: hold for that many generations like this one (an image set, this its longest prompt),
        which then share the hold. ``job``: a batch job's id: the set at the batch price, held until its
        lines are collected (see :mod:`nbimagine._budget`)."""
        from ._budget import hold

        if self._holds is None:
            self._holds = hold(self.session, self._budget_history(),
                               lambda: self.estimate(count, batch=job is not None), self.n * count,
                               notebook_required=self.record, job=job)
            self._own_holds = count == 1 and job is None  # else the set's or the job's to give back
        return self._holds

    def _release_unsent(self) -> None:
        """Once the job has ended, give back what requests that never started still hold (a Ctrl-C or
        ``cancel`` that landed before the coroutine ran); a no-op when every request settled."""
        if self._holds is not None and self._own_holds and self.job is not None and self.job.done():
            self._holds.release_all()

    def start(self, on_event: EventCallback | None = None) -> Job[list[Reply | None]]:
        """Start all variants on the background loop and return the ``Job`` (non-blocking).

        Raises ``BudgetError`` first when a budget is set and this could pass it."""
        if self.job is not None:
            raise RuntimeError("this Generation was already started; make a new one")
        agent = self.build_agent()
        holds = self.hold_budget()
        try:
            if self.record:
                self._check_parents(self.history)  # opened here: a bad history folder fails on the caller's thread
                self._record_mask()
            self._started_at = time.perf_counter()
            self.job = Job(self._run_all(agent, on_event))
        except BaseException:
            holds.release_all()
            raise
        return self.job

    def _check_parents(self, history: History) -> None:
        # Checked before any request: an unknown parent would fail the history write after the images
        # were paid for. An edit may carry a history id of another folder (ids are unique per folder):
        # absent here, or naming different bytes here, that link is dropped.
        shas: dict[int, set[str]] = {}
        for edit in self.edits:
            if isinstance(edit.metadata.get("history_id"), int):
                shas.setdefault(edit.metadata["history_id"], set()).add(edit.sha256)
        missing = [p for p in self.parents if p not in history]
        unknown = [p for p in missing if p not in shas]
        if unknown:
            raise ConfigError(f"parent image {', '.join(f'#{p}' for p in unknown)} is not in the image history "
                              f"of {history.path}; %imagine history lists the ids")
        foreign = [p for p in self.parents if p in shas and p not in missing and history.get(p).sha256 not in shas[p]]
        self.parents = [p for p in self.parents if p not in missing and p not in foreign]

    def cancel(self) -> None:
        """Stop every variant now (their HTTP requests are aborted)."""
        if self.job is not None:
            self.job.cancel()
            self._release_unsent()

    def wait(self, on_poll: Callable[[], None] | None = None, *, warn: bool = True) -> list[Reply]:
        """Block until done (``on_poll`` runs every 50 ms); return the replies.

        If any variant failed, the first error is raised once all variants have ended; the
        replies and entries of the others are still on ``replies`` / ``entries``. Ctrl-C cancels
        and re-raises ``KeyboardInterrupt``. Problems after the answer (the history) do not raise:
        with ``warn`` each line of ``warnings`` is emitted as an ``ImagineWarning``.
        """
        if self.job is None:
            self.start()
        assert self.job is not None
        try:
            self.job.result(on_poll=on_poll)
        finally:
            self._release_unsent()
        if warn:
            for line in self.warnings:
                warnings.warn(line, ImagineWarning, stacklevel=2)
        for error in self.errors:
            if error is not None:
                raise error
        return [r for r in self.replies if r is not None]

    @property
    def stopped(self) -> int:
        """How many variants were stopped before their provider answered (by ``cancel`` or Ctrl-C)."""
        return sum(1 for reply, error in zip(self.replies, self.errors, strict=True)
                   if reply is None and error is None)

    def images(self, index: int) -> list[BinaryResult]:
        """Every image variant ``index`` has: its reply's, its error's, or those that arrived before a cancel."""
        reply, error = self.replies[index], self.errors[index]
        if reply is not None:
            return list(reply.files)
        if isinstance(error, ProviderError) and error.files:
            return list(error.files)
        return list(self.arrived[index])

    def run(self, on_event: EventCallback | None = None, on_poll: Callable[[], None] | None = None) -> list[Reply]:
        """``start`` then ``wait``."""
        self.start(on_event)
        return self.wait(on_poll)

    async def run_async(self, on_event: EventCallback | None = None) -> list[Reply | None]:
        """Run every variant in the running event loop (many generations in one task: ``generate_many``).

        Errors stay on ``errors`` (nothing is raised but cancellation), as with ``start``.
        """
        agent = self.build_agent()
        self._started_at = time.perf_counter()
        return await self._run_all(agent, on_event)

    # --- the coroutines --------------------------------------------------------------------------

    async def _run_all(self, agent: Agent, on_event: EventCallback | None) -> list[Reply | None]:
        try:
            # return_exceptions: one failed variant must not orphan the others mid-request.
            await asyncio.gather(*(self._one(agent, i, on_event) for i in range(self.n)),
                                 return_exceptions=True)
        finally:
            self._ended_at = time.perf_counter()
        return self.replies

    async def _one(self, agent: Agent, index: int, on_event: EventCallback | None) -> None:
        from ._providers._base import ON_RETRYABLE, RETRY_ADVICE, SIGN_IN_ADVICE

        inputs = self._inputs()
        extra = {"refs": self.refs, "mask": self.mask}
        # Each variant runs in its own task, so these context variables are this variant's alone.
        RETRY_ADVICE.set(self.retry_advice)
        SIGN_IN_ADVICE.set(self.offline_advice)
        if on_event is not None:
            ON_RETRYABLE.set(_retry_reporter(on_event, index, agent.config.max_retries))
        accounted.set(True)  # this generation holds the budgets for its requests (hold_budget)
        try:
            await self._request(agent, index, inputs, extra, on_event)
        finally:
            if (await _to_the_end(self._settle, index))[1]:
                raise asyncio.CancelledError

    async def _request(self, agent: Agent, index: int, inputs: list[Any], extra: dict[str, Any],
                       on_event: EventCallback | None) -> None:
        async def request() -> Reply:
            if on_event is None:
                self.replies[index] = await agent.ask(*inputs, **extra)
                return self.replies[index]
            stream = agent.stream(*inputs, **extra)
            try:
                async for event in stream:
                    if isinstance(event, ReplyEvent):
                        # The last event: the answer is in (kept even if Ctrl-C lands while closing).
                        self.replies[index] = event.reply
                        return event.reply
                    if isinstance(event, ImageEvent):
                        self.arrived[index].append(event.image)
                    else:
                        _safe_call(on_event, index, event)
            finally:
                await stream.aclose()
            raise ProviderError("The stream ended without a reply", provider=self.provider, files=self.arrived[index])

        try:
            # The limiter (many prompts) paces the request and retries it after a 429.
            await (request() if self.limiter is None else self.limiter.call(request))
        except asyncio.CancelledError:
            # Stopped: whatever had already arrived is paid for, so it is still recorded.
            reply = self.replies[index]
            if reply is not None:
                await self._record(index, reply.files, reply.body)
            else:
                await self._record(index, self.arrived[index], None)
            raise
        except Exception as exc:
            self.errors[index] = exc
            if isinstance(exc, ProviderError) and exc.files:
                # Images made before a failure are kept in the history (and on exc.files).
                await self._record(index, exc.files, None)
            return
        reply = self.replies[index]
        assert reply is not None
        await self._record(index, reply.files, reply.body)
        if on_event is not None:
            _safe_call(on_event, index, ReplyEvent(reply))

    def _settle(self, index: int) -> None:
        """Count variant ``index``'s spending (session, and the notebook's record for what its history does
        not hold), then give back its hold (blocking: history writes)."""
        if self._holds is not None:
            reply = self.replies[index]
            images, recorded = len(self.images(index)), len(self.variant_entries[index])
            problem = self._holds.settle(reply, images, recorded, provider=self.provider,
                                         model=(reply.model if reply is not None else None) or self.model)
            if problem and not (self.record and recorded < images):  # else the history warning says it all
                self.warnings.append(problem)

    async def _record(self, index: int, files: list[BinaryResult], text: str | None) -> None:
        """Record ``files``; never raises (failures become ``warnings``), and a cancellation that lands
        meanwhile waits for the recording to end, then is re-raised."""
        if not self.record or not files:
            return
        reply = self.replies[index]
        share = self._holds.share if self._holds is not None else None
        stored = files
        if share and (reply is None or reply.cost is None):
            # A paid image of unknown cost: budgets count its request's estimated high end (never shown as a cost).
            stored = [BinaryResult(f.data, {**f.metadata, "budget_charge_usd": share / len(files)}) for f in files]
        # SQLite and file writes are blocking: keep them off the event loop.
        task, cancelled = await _to_the_end(self._record_sync, stored, text)
        if task.cancelled():
            raise asyncio.CancelledError
        if task.exception() is not None:
            entries, problem = [], task.exception()
        else:
            entries, problem = task.result()
        self.variant_entries[index].extend(entries)
        # ``files`` is the list the images live on (the reply's, the error's or ``arrived``): each recorded
        # one now carries its history id, so it is named by id (never by its bytes, which may repeat).
        files[: len(entries)] = [_with_history_id(f, entry.id) for f, entry in zip(files, entries, strict=False)]
        if problem is not None:
            # One line per cause for the whole generation: -n 4 against a locked history is one line
            # that says 4 images, not four identical lines (or one that says "the image").
            reason = f"{type(problem).__name__}: {' '.join(str(problem).split()) or type(problem).__name__}"
            missing, at = self._unrecorded.get(reason, (0, len(self.warnings)))
            missing += len(files) - len(entries)
            self._unrecorded[reason] = (missing, at)
            self.warnings[at:at + 1] = [_history_warning(missing, reason)]
        if cancelled:
            raise asyncio.CancelledError

    def _record_sync(self, files: list[BinaryResult], text: str | None) -> tuple[list[HistoryEntry], Exception | None]:
        """Add each image; stop at the first failure and return it with the entries made before it."""
        entries: list[HistoryEntry] = []
        try:
            params = self.params
            for image in files:
                entries.append(self.history.add(
                    image, prompt=self.prompt, provider=self.provider, model=image.metadata.get("model") or self.model,
                    params=params, parents=self.parents, text=text or None))
        except Exception as exc:  # any history failure (locked, read-only, full, corrupt): a warning
            return entries, exc
        return entries, None


async def _to_the_end(fn: Callable[..., Any], *args: Any) -> tuple[asyncio.Future[Any], bool]:
    """Run blocking ``fn(*args)`` in a thread and wait for its end, even when cancelled meanwhile: what it
    records or counts must be. Returns the finished task and whether a cancellation landed (the caller
    re-raises it once it has used the result)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    return task, cancelled


def _history_warning(missing: int, reason: str) -> str:
    one = missing == 1
    return (f"{missing} image{'' if one else 's'} could not be recorded in the history ({reason}); "
            f"{'it is' if one else 'they are'} shown and returned as usual: keep {'it' if one else 'them'} "
            "with -o / .save(), or retry with the history fixed")


def _retry_reporter(on_event: EventCallback, index: int, limit: int) -> Callable[[int], None]:
    seen = 0

    def report(status: int) -> None:
        nonlocal seen
        seen += 1
        if seen <= limit:  # the last failed attempt is not retried: its error follows instead
            _safe_call(on_event, index, Retrying(status, seen, limit))

    return report


def _with_history_id(image: BinaryResult, history_id: int) -> BinaryResult:
    return BinaryResult(image.data, {**image.metadata, "history_id": history_id})


def _safe_call(callback: EventCallback, index: int, event: StreamEvent | Retrying) -> None:
    # A broken progress display must not fail (or hang) the generation itself.
    try:
        callback(index, event)
    except Exception:  # reported, never propagated into the request
        import traceback

        traceback.print_exc()
