"""Many prompts at once: ``generate_many`` (concurrent, under the provider's rate limit) and the
:class:`ImageSet` it returns (also what a batch job's results are).

Every request of a run passes through one :class:`RateLimiter`: at most ``concurrency`` requests in
flight, request starts spaced by the provider's rate once it is known, and after a 429 every
worker waits until the provider's ``retry-after`` before the next start. The SDKs' own retries are
switched off for these requests (``max_retries=0``): N workers each retrying on their own is the
retry storm that gets a request rejected again and again.

Each prompt is one :class:`~nbimagine._generate.Generation` (the same flow as one ``%%imagine``
cell: every paid image reaches the history and the result, whatever fails afterwards).
"""

from __future__ import annotations

import asyncio
import collections
import html
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._options import option
from .errors import ConfigError, ContentPolicyError, InputError, ProviderError, SetInterrupted

if TYPE_CHECKING:
    from ._agent import Agent, Reply
    from ._budget import Holds
    from ._history import History, HistoryEntry
    from ._providers._base import RateHeaders
    from .config import ProviderConfig
    from .events import BinaryResult

__all__ = ["ImageSet", "PromptResult", "RateLimiter", "as_prompts", "generate_many"]

# --concurrency and --rate-limit are rows of the option table: their defaults and bounds live there.
DEFAULT_CONCURRENCY: int = option("concurrency").default
# A 429 costs nothing, so it is retried more patiently than a server error (which the SDKs retry twice).
_RATE_LIMIT_RETRIES = 10
_SERVER_RETRIES = 2
# A request rejected once keeps this fraction of the interval more from the request before it.
_RETRY_GUARD = 0.1
# How long the other requests of a set wait for the first answer's rate-limit headers (seconds).
_PROBE_WAIT = 2.0


# --- prompts ----------------------------------------------------------------------------------------


def as_prompts(prompts: Any) -> list[str]:
    """``prompts`` as a list of non-empty strings: a list/tuple/iterable of ``str``, a pandas or
    polars Series (a DataFrame column), or a text file (a ``pathlib.Path`` or an open text file):
    UTF-8, one prompt per line, blank lines skipped, as in ``%%imagine --each``. Neither pandas nor
    polars is imported here. Each prompt is stripped (a byte-order mark too); nothing else changes.

    Raises ``ConfigError`` naming the first bad item (a missing value, a number, an empty string) and
    ``InputError`` for text that cannot be sent (a lone surrogate), before any request.
    """
    import os

    from .events import check_text

    if isinstance(prompts, (str, bytes)):
        raise ConfigError("generate_many() takes a list of prompts (or a DataFrame column, or a pathlib.Path of "
                          "a text file with one prompt per line), not one string; for a single prompt use "
                          "%%imagine or Agent.ask()")
    if isinstance(prompts, os.PathLike) or hasattr(prompts, "readline"):
        return _prompts_file(prompts)
    if hasattr(prompts, "columns") and not hasattr(prompts, "dtype"):
        raise ConfigError("pass one column of the DataFrame, e.g. df['prompt'], not the whole DataFrame")
    try:
        items = list(prompts.to_list() if hasattr(prompts, "to_list") else prompts)
    except TypeError:
        raise ConfigError(f"prompts must be a list of strings or a DataFrame column, not "
                          f"{type(prompts).__name__}") from None
    out: list[str] = []
    for position, item in enumerate(items):
        if item is None or (isinstance(item, float) and item != item):
            raise ConfigError(f"prompt {position} is missing (None/NaN); drop missing values first, "
                              "e.g. df['prompt'].dropna()")
        if not isinstance(item, str):
            raise ConfigError(f"prompt {position} is a {type(item).__name__} ({item!r}), not a string")
        item = item.strip().lstrip("\ufeff").strip()
        if not item:
            raise ConfigError(f"prompt {position} is empty")
        out.append(check_text(item, f"Prompt {position}"))
    if not out:
        raise ConfigError("there are no prompts: give at least one")
    return out


def _prompts_file(source: Any) -> list[str]:
    """The prompts of a text file: UTF-8 (a byte-order mark is dropped), one per line, blank lines skipped."""
    if hasattr(source, "readline"):
        text = source.read()
        where = getattr(source, "name", "the file")
    else:
        where = str(source)
        try:
            with open(source, encoding="utf-8-sig", newline=None) as handle:
                text = handle.read()
        except UnicodeDecodeError as exc:
            raise InputError(f"{where} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
        except OSError as exc:
            raise InputError(f"Cannot read the prompts file {where}: {exc.strerror or exc}") from None
    if isinstance(text, bytes):
        raise ConfigError(f"open {where} in text mode (open(path, encoding='utf-8')), not binary")
    lines = [line for line in text.splitlines() if line.strip().lstrip("\ufeff").strip()]
    if not lines:
        raise ConfigError(f"there are no prompts in {where}: write one per line")
    return as_prompts(lines)


# --- the shared limiter -----------------------------------------------------------------------------


class RateLimiter:
    """One per run, shared by every request of it (on the ``_sync`` background loop).

    ``concurrency`` bounds the requests in flight. Request starts are spaced by the provider's
    interval (``60 / rate_limit`` s) from the first one when the limit is known: given, learnt by an
    earlier run in this process for the same provider, base URL and model, or stated by a 429
    (``ProviderError.rate_limit``: ``x-ratelimit-limit-requests``, Google's ``quotaValue``). This is
    GCRA on the client side: a schedule of start times, one slot per interval, which a limit with
    no burst allowance (the strictest form, what the emulator enforces) accepts.

    A provider that states its limit on every answer (``probe``: OpenAI's ``x-ratelimit-*``
    headers) teaches it before any 429: while the limit is unknown the first request goes alone,
    and the others wait for its answer's headers (they come before the body; any outcome of that
    request releases them too), for ``_PROBE_WAIT`` seconds at most: an answer slower than that
    (a whole image without streaming) is not worth the wait, and the limit is then learnt from the
    first headers or 429s that come. Every answer's headers keep the schedule honest: with no
    request remaining, nobody starts before the provider's reset (at most one interval).

    Slots are counted from when a request really goes: a task woken late by a busy event loop
    moves the next slots later, so the provider never sees two requests closer than the spacing.

    After a 429 the run backs off as one: no request starts until the provider's ``retry_after``
    has passed, and the rejected request is the first to go then. As the provider counts from its
    own clock, a request sent ``retry_after`` after its rejection arrived cannot arrive early, and
    a request already rejected once keeps a tenth of the interval more from the one before it, so
    no request is rejected twice in a row. A 429 met while the limit was already known means the
    request arrived early (scheduling and network jitter beyond the 2% spacing margin): half of
    that is added to the spacing, up to 5% of the interval. Server errors (408, 409, 5xx) are
    retried with exponential backoff; a failure that already carries images (``error.files``) or a
    policy refusal is never retried.
    """

    def __init__(self, concurrency: int = DEFAULT_CONCURRENCY, rate_limit: float | None = None, *,
                 key: tuple[str, ...] | None = None, retries: int | None = None, probe: bool = False) -> None:
        option("concurrency").validate(concurrency, label="concurrency=")
        option("rate_limit").validate(rate_limit, label="rate_limit= (requests per minute)")
        self.concurrency = concurrency
        self.key = key
        # Server errors are retried as often as the SDK would have (its max_retries, default 2).
        self.retries = _SERVER_RETRIES if retries is None else retries
        self.interval = 60.0 / rate_limit if rate_limit else _LEARNT.get(key, 0.0) if key else 0.0
        self.margin = 0.0  # seconds added to the interval: learnt from requests that arrived early
        self.running = 0
        self.rejected = 0  # 429s met (each retried once the provider allows)
        self.rejected_again = 0  # 429s met by a request whose previous attempt met one too
        self.retried = 0  # every retry, 429 or server error
        self.starts: list[tuple[float, bool]] = []  # (loop time, is a retry) of every admission, in order
        self._next_start = 0.0
        self._last_start: float | None = None
        self._waiting: collections.deque[tuple[asyncio.Future[float], bool]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._semaphore: asyncio.Semaphore | None = None
        # The first request's ticket while it goes alone to learn the limit; "due" before it is granted.
        self._probe: asyncio.Future[float] | str | None = "due" if probe and not self.interval else None
        self._probe_timer: asyncio.TimerHandle | None = None

    # --- admission (all on the loop's thread: no lock needed) ------------------------------------

    def _spacing(self) -> float:
        # 2% over the interval from the start: a request sent on schedule may arrive a little early.
        return self.interval * 1.02 + self.margin if self.interval else 0.0

    async def _admit(self, retry: bool) -> tuple[float, bool]:
        """Wait for a start slot (a ``retry`` goes ahead of every other waiter); return its loop time, and
        whether this request is the one that goes alone to learn the limit."""
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[float] = loop.create_future()
        if retry:
            self._waiting.appendleft((ticket, True))
        else:
            self._waiting.append((ticket, False))
        self._dispatch()
        try:
            granted = await ticket
        except asyncio.CancelledError:
            self._waiting = collections.deque(item for item in self._waiting if item[0] is not ticket)
            raise
        resumed = loop.time()
        if self.interval and granted == self._last_start and resumed + self._spacing() > self._next_start:
            # Woken late (a busy loop): the provider will see this request late, so the next one waits too.
            self._last_start = resumed
            self._reschedule(resumed + self._spacing())
        return resumed, ticket is self._probe

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            ticket, retry = self._waiting[0]
            if ticket.done():  # cancelled meanwhile
                self._waiting.popleft()
                continue
            if isinstance(self._probe, asyncio.Future):  # the first request is out alone: wait for its answer
                return
            due = self._next_start + (self.interval * _RETRY_GUARD if retry else 0.0)
            now = loop.time()
            if now < due:
                self._timer = loop.call_at(due, self._dispatch)
                return
            self._waiting.popleft()
            ticket.set_result(now)
            self.starts.append((now, retry))
            self._last_start = now
            self._next_start = now + self._spacing()
            if self._probe == "due" and not self.interval:
                self._probe = ticket
                self._probe_timer = loop.call_later(_PROBE_WAIT, self._end_probe)
                return

    def _end_probe(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._probe is not None:
            self._probe = None
            self._dispatch()

    def observe(self, stated: RateHeaders) -> None:
        """An answer's request-limit headers (called from the SDK's response hook, on the loop's thread)."""
        now = asyncio.get_running_loop().time()
        if stated.limit:
            interval = 60.0 / stated.limit
            if interval > self.interval:
                self.interval = interval
                if self.key is not None:
                    _LEARNT[self.key] = max(_LEARNT.get(self.key, 0.0), interval)
                if self._last_start is not None:  # the slots already given were unspaced: space from the last
                    self._next_start = max(self._next_start, self._last_start + self._spacing())
        if stated.remaining == 0 and stated.reset is not None:
            # Nothing left now: the next request is allowed after the reset, or one interval at most (a bucket
            # larger than one request refills by one per interval).
            wait = min(stated.reset, self.interval) if self.interval else stated.reset
            self._next_start = max(self._next_start, now + wait)
        if self._probe is not None:
            self._end_probe()
        else:
            self._dispatch()

    def _reschedule(self, earliest: float, *, dispatch: bool = True) -> None:
        self._next_start = earliest
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if dispatch:
            self._dispatch()

    def _backoff(self, exc: ProviderError, attempt: int, started: float, interval_then: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if exc.status != 429:
            wait = exc.retry_after if exc.retry_after is not None else min(0.5 * 2 ** attempt, 8.0)
            # Not dispatched here: the retry is queued first, then the queue moves (``call``).
            self._reschedule(max(self._next_start, now + wait), dispatch=False)
            return
        self.rejected += 1
        if exc.rate_limit:
            self.interval = max(self.interval, 60.0 / exc.rate_limit)
        elif exc.retry_after and not self.interval:
            # No stated limit: space starts by the wait the provider asked for.
            self.interval = exc.retry_after
        if self.key is not None and self.interval:
            _LEARNT[self.key] = max(_LEARNT.get(self.key, 0.0), self.interval)
        wait = exc.retry_after if exc.retry_after is not None else min(0.5 * 2 ** attempt, 30.0)
        if interval_then and exc.retry_after is not None:
            # Sent on schedule, yet early by `wait` at the provider: widen the spacing a little.
            self.margin = min(max(self.margin, wait / 2), interval_then * 0.05)
        earliest = now + wait
        if self._last_start is not None and self._last_start > started:
            # Others started since this one: the provider counted them; keep their spacing too.
            earliest = max(earliest, self._last_start + self._spacing())
        self._reschedule(earliest, dispatch=False)

    async def call(self, request: Callable[[], Any]) -> Any:
        """Run ``await request()`` under the limits, retrying what the provider asks to retry."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        from ._providers._base import ON_RATE_HEADERS

        attempt = 0
        limited = False  # the previous attempt met a 429
        ON_RATE_HEADERS.set(self.observe)  # this task's requests tell their answers' limit headers
        async with self._semaphore:
            while True:
                interval_then = self.interval
                started, probe = await self._admit(retry=attempt > 0)
                self.running += 1
                try:
                    return await request()
                except ContentPolicyError:
                    raise
                except ProviderError as exc:
                    if exc.status == 429 and limited:
                        self.rejected_again += 1
                    limited = exc.status == 429
                    limit = _RATE_LIMIT_RETRIES if exc.status == 429 else self.retries
                    retryable = exc.status in (408, 409, 429) or (exc.status or 0) >= 500
                    if not retryable or exc.files or attempt >= limit:
                        raise
                    attempt += 1
                    self.retried += 1
                    self._backoff(exc, attempt, started, interval_then)
                finally:
                    self.running -= 1
                    if probe and self._probe is not None:  # answered without limit headers, or failed
                        self._end_probe()


# Intervals (s) learnt from 429s in this process, per (provider, base URL, model): the next run with the
# same provider paces from its first request.
_LEARNT: dict[tuple[str, ...], float] = {}


def limiter_key(config: Any) -> tuple[str, ...]:
    """Who a rate limit belongs to: the provider kind, its base URL (or endpoint) and the model."""
    where = getattr(config, "base_url", None) or getattr(config, "azure_endpoint", None) or ""
    return (type(config).provider, str(where), str(getattr(config, "model", "")))


# --- results ----------------------------------------------------------------------------------------


@dataclass
class PromptResult:
    """What one prompt of a set gave: its ``replies`` (one per variant) and history ``entries``, or the
    ``error`` it met (images made before a failure are still in ``files`` and the history)."""

    index: int
    prompt: str
    replies: list[Reply] = field(default_factory=list)
    entries: list[HistoryEntry] = field(default_factory=list)
    error: BaseException | None = None
    custom_id: str | None = None  # the batch line's id, for results of a batch job

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def files(self) -> list[BinaryResult]:
        """The images, from the replies, else (batch results keep them on disk) read from the history."""
        made = [image for reply in self.replies for image in reply.files]
        if not made and self.entries:
            made = [entry.image for entry in self.entries]
        if not made and isinstance(self.error, ProviderError):
            made = list(self.error.files)
        return made

    @property
    def count(self) -> int:
        """How many images, without reading any from disk."""
        return len(self.entries) or sum(len(reply.files) for reply in self.replies) or (
            len(self.error.files) if isinstance(self.error, ProviderError) else 0)

    def __repr__(self) -> str:
        what = f"error={type(self.error).__name__}" if self.error else f"{len(self.files)} image(s)"
        return f"PromptResult({self.index}, {_clip(self.prompt, 40)!r}, {what})"


class ImageSet(Sequence[PromptResult]):
    """The outcome of a set of prompts, one :class:`PromptResult` per prompt in the order given.

    Nothing is raised for per-prompt failures: they are listed in ``failures`` (and shown), and
    every success is kept. ``files`` are all images in prompt order; ``entries`` their history rows.
    ``job_id`` names the batch job for results of :func:`nbimagine.submit_batch`. A set generated
    now says how it ran: ``concurrency`` (requests in flight at most), ``rate_limit`` (the requests
    per minute it was paced at, given or learnt; None when no limit was known) and ``rejected``
    (requests that met a 429 and were sent again).
    """

    def __init__(self, results: Sequence[PromptResult], *, elapsed: float | None = None, job_id: str | None = None,
                 state: str | None = None, rejected: int = 0, concurrency: int | None = None,
                 rate_limit: float | None = None) -> None:
        self.results = list(results)
        self.elapsed = elapsed
        self.job_id = job_id
        self.state = state
        self.rejected = rejected
        self.concurrency = concurrency
        self.rate_limit = rate_limit

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: Any) -> Any:
        return self.results[index]

    def __iter__(self) -> Iterator[PromptResult]:
        return iter(self.results)

    @property
    def ok(self) -> list[PromptResult]:
        return [r for r in self.results if r.error is None]

    @property
    def failures(self) -> list[PromptResult]:
        return [r for r in self.results if r.error is not None]

    @property
    def files(self) -> list[BinaryResult]:
        return [image for r in self.results for image in r.files]

    @property
    def entries(self) -> list[HistoryEntry]:
        return [e for r in self.results for e in r.entries]

    @property
    def summary(self) -> str:
        done = len(self.ok)
        head = f"{done} of {len(self)} prompt(s) done, {sum(r.count for r in self.results)} image(s)"
        if self.job_id:
            head += f" from batch {self.job_id}" + (f" ({self.state})" if self.state else "")
        if self.elapsed is not None:
            head += f" in {self.elapsed:.1f} s"
        if self.rate_limit:
            head += f", paced at {self.rate_limit:g} requests/min"
        if self.rejected:
            head += f"; {self.rejected} request(s) waited out a rate limit"
        if self.failures:
            head += f"; {len(self.failures)} failed"
        return head

    def failure_lines(self, limit: int | None = None) -> list[str]:
        """One line per failed prompt (its index, prompt and error); with ``limit``, the first ``limit`` and
        a last line counting the others (a set of 10,000 prompts must not print 10,000 lines)."""
        failures = self.failures
        shown = failures if limit is None else failures[:limit]
        lines = [f"[{r.index}] {_clip(r.prompt, 50)!r}: {type(r.error).__name__}: {_clip(str(r.error), 160)}"
                 for r in shown]
        if len(failures) > len(shown):
            lines.append(f"... and {len(failures) - len(shown)} more (all of them: .failures)")
        return lines

    def __repr__(self) -> str:
        return "\n".join([self.summary, *("  " + line for line in self.failure_lines(_FAILURES_SHOWN))])

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {"text/plain": repr(self), "text/html": set_html(self)}


_GALLERY_LIMIT = 48  # thumbnails shown inline; the rest are one %imagine history away
_FAILURES_SHOWN = 20  # failure lines shown; .failures has them all


def set_html(images: ImageSet) -> str:
    """Thumbnails (from the history's cached ones where recorded) with their prompt, then the failures."""
    import base64

    from ._images import sniff_media_type

    cells = []
    shown = 0
    for r in images.results:
        # Recorded images are shown from the history's cached thumbnails, never read in full.
        items: list[Any] = list(r.entries) if r.entries else r.files
        for item in items:
            if shown >= _GALLERY_LIMIT:
                break
            shown += 1
            entry = item if r.entries else None
            try:
                thumb = entry.thumbnail(160) if entry is not None else _thumbnail(item.data)
            except Exception:  # a thumbnail failure must not hide the set
                thumb = b""
            media = sniff_media_type(thumb) or "image/jpeg"
            img = (f'<img src="data:{media};base64,{base64.b64encode(thumb).decode()}" '
                   'style="max-width:160px;max-height:160px;display:block"/>' if thumb else "")
            ref = f"<b>#{entry.id}</b> " if entry is not None else ""
            cells.append(f'<figure style="margin:0;width:160px">{img}<figcaption style="font-size:0.8em">'
                         f"{ref}[{r.index}] {html.escape(_clip(r.prompt, 60))}</figcaption></figure>")
    more = sum(r.count for r in images.results) - shown
    tail = f"<div>… and {more} more image(s): %imagine history lists them.</div>" if more > 0 else ""
    failures = "".join(f"<li><code>{html.escape(line)}</code></li>"
                       for line in images.failure_lines(_FAILURES_SHOWN))
    failed = f"<div><b>Failed:</b><ul>{failures}</ul></div>" if failures else ""
    return (f"<div><b>{html.escape(images.summary)}</b></div>"
            f'<div style="display:flex;flex-wrap:wrap;gap:8px">{"".join(cells)}</div>{tail}{failed}')


def _thumbnail(data: bytes, side: int = 160) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (side, side))
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the runner -------------------------------------------------------------------------------------


class ManyRun:
    """A running ``generate_many``: its generations, their limiter, and live counts for a progress bar."""

    def __init__(self, prompts: list[str], *, agent: Agent, params: dict[str, Any] | None, n: int,
                 overrides: dict[str, Any], record: bool, history: History | None, concurrency: int,
                 rate_limit: float | None, edits: Sequence[BinaryResult] = (), refs: Sequence[BinaryResult] = (),
                 mask: BinaryResult | None = None, parents: Sequence[int] = (), retries: int | None = None) -> None:
        from ._generate import Generation

        self.limiter = RateLimiter(concurrency, rate_limit, key=limiter_key(agent.config), retries=retries,
                                   probe=agent._provider.states_rate_limit and len(prompts) * n > 1)
        first = Generation(prompts[0], edits=edits, refs=refs, mask=mask, parents=parents, n=n, overrides=overrides,
                           record=record, history=history, agent=agent, params=params, limiter=self.limiter)
        if record and history is not None:
            first._check_parents(history)  # once, before any request
            first._record_mask()  # once: every prompt's images descend from the same mask entry
        self.generations = [first, *(
            Generation(prompt, edits=edits, refs=refs, n=n, overrides=overrides, record=record, history=history,
                       agent=agent, params=params, limiter=self.limiter) for prompt in prompts[1:])]
        for gen in self.generations:
            gen.mask, gen.parents = first.mask, first.parents
            gen._params = first.params  # frozen now: the session may change while the set runs
        self.done = 0
        self.failed = 0
        self.holds: Holds | None = None
        self.started_at = 0.0
        self.ended_at: float | None = None

    @property
    def running(self) -> int:
        return self.limiter.running

    def hold_budget(self) -> None:
        """``BudgetError`` before any request when the whole set could take spending past a budget (the
        estimate of its longest prompt, times the number of prompts); else hold that for the set: every
        generation shares the hold, and each request gives back its share as it ends."""
        if self.holds is not None:
            return
        longest = max(self.generations, key=lambda gen: len(gen.prompt))
        self.holds = longest.hold_budget(count=len(self.generations))
        for gen in self.generations:
            gen._holds = self.holds

    @property
    def elapsed(self) -> float:
        return (self.ended_at or time.perf_counter()) - self.started_at if self.started_at else 0.0

    async def run(self) -> None:
        # The SDK is imported, its client made and its models built before the first request is
        # admitted: the limiter spaces admissions, and a first request that spent a second importing
        # would reach the provider together with the second one.
        agent = self.generations[0].build_agent() if self.generations else None
        if agent is not None:
            agent._provider.client()
            await asyncio.to_thread(agent._provider.warm_up)
        self.started_at = time.perf_counter()

        async def one(gen: Any) -> None:
            await gen.run_async()
            if any(e is not None for e in gen.errors):
                self.failed += 1
            else:
                self.done += 1

        try:
            # Every generation is a task from the start; the limiter decides when each request goes.
            await asyncio.gather(*(one(gen) for gen in self.generations))
        finally:
            self.ended_at = time.perf_counter()
            self.release()

    def release(self) -> None:
        """Give back what the set still holds of the budgets (requests never sent: a cancelled run)."""
        if self.holds is not None:
            self.holds.release_all()

    def results(self) -> ImageSet:
        out = []
        for index, gen in enumerate(self.generations):
            error = next((e for e in gen.errors if e is not None), None)
            if gen.job is None and gen._started_at is None and error is None:
                error = _NotRun("not started (the run was cancelled)")
            elif error is None and any(r is None for r in gen.replies):
                error = _NotRun("cancelled before it finished")
            out.append(PromptResult(index, gen.prompt, [r for r in gen.replies if r is not None], gen.entries,
                                    error))
        limiter = self.limiter
        return ImageSet(out, elapsed=self.elapsed, rejected=limiter.rejected, concurrency=limiter.concurrency,
                        rate_limit=round(60.0 / limiter.interval, 3) if limiter.interval else None)


class _NotRun(ProviderError):
    """A prompt of a cancelled run that never got its answer."""

    def __init__(self, why: str) -> None:
        super().__init__(why, code="cancelled")


def prepare_agent(config: ProviderConfig | None, tools: Sequence[object], options: dict[str, Any],
                  session: Any, *, check: bool = True) -> tuple[Agent, dict[str, Any] | None]:
    """The one agent a set uses, with the SDK's own retries off (the shared limiter retries), and the
    parameters to record (``None``: the session's, taken per generation). ``check``: credentials too."""
    from ._agent import Agent

    if config is not None:
        if options:
            raise ConfigError(f"with config= the parameters go in the config and tools, not as options "
                              f"({', '.join(sorted(options))})")
        agent = Agent("imagine-set", config=config.replace(max_retries=0), tools=tools)
        params = _config_params(config, tools)
    else:
        if tools:
            raise ConfigError("tools= needs config=; without a config the session's provider and options apply")
        built = session.build_agent(**options)
        agent = Agent(built.name, config=built.config.replace(max_retries=0), tools=built.tools)
        params = None
    if check:
        agent._provider.check_credentials()  # a missing key is one error now, not one per prompt
    return agent, params


def _config_params(config: ProviderConfig, tools: Sequence[object]) -> dict[str, Any]:
    from .config import OpenAIImagesConfig, image_config_fields
    from .tools import ImageGenerationTool

    if isinstance(config, OpenAIImagesConfig):  # the Images API takes its parameters on the config
        return {name: value for name, value in config.params().items() if name not in config.ignored_params()}
    params: dict[str, Any] = {}
    for tool in tools:
        if isinstance(tool, ImageGenerationTool):
            params.update(tool.params())
    params.update(image_config_fields(getattr(config, "image_config", None)))
    return params


def generate_many(
    prompts: Iterable[str] | Any,
    *,
    config: ProviderConfig | None = None,
    tools: Sequence[object] = (),
    n: int = 1,
    concurrency: int | None = None,
    rate_limit: int | None = None,
    record: bool = True,
    progress: bool = True,
    history: History | None = None,
    **options: Any,
) -> ImageSet:
    """Generate one image set: every prompt of ``prompts`` (a list, or a pandas / polars column) now,
    ``concurrency`` requests at a time (default: the session's, 4; ``%imagine use --concurrency N``),
    ``n`` variants each.

    Without ``config`` the session's provider and options apply (as in ``%%imagine``), overridden by
    ``options`` (``provider="gemini"``, ``aspect_ratio="16:9"``, ``size="1024x1024"``...); with
    ``config`` (and ``tools``) that provider configuration is used as given, as for ``Agent``.
    ``rate_limit`` (requests per minute; default the session's ``--rate-limit``) spaces requests from
    the start when you know your limit; otherwise it is learnt from the provider's answers: OpenAI's
    ``x-ratelimit-*`` headers (the first request goes alone until its answer's headers arrive), a
    429's ``x-ratelimit-limit-requests`` or Google's ``quotaValue``. Each image is recorded in the notebook's
    history (unless ``record=False``); ``progress`` shows a tqdm bar (done / failed / running).

    Returns an :class:`ImageSet`; prompts that failed are in ``.failures`` with their error, and do
    not stop the others. Bad prompts, options or a missing key raise ``ConfigError``, and a set that
    could take spending past a budget (``%imagine budget``) ``BudgetError``, before any request.
    Ctrl-C cancels the requests in flight and raises :class:`~nbimagine.errors.SetInterrupted` (a
    ``KeyboardInterrupt``) whose ``results`` hold what was made (already in the history) and say
    which prompts were cancelled.
    """
    from ._generate import MAX_VARIANTS
    from ._session import get_session

    items = as_prompts(prompts)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_VARIANTS:
        raise ConfigError(f"n is the number of variants per prompt, an integer from 1 to {MAX_VARIANTS}, not {n!r}")
    session = get_session()
    agent, params = prepare_agent(config, tools, options, session)
    if record and history is None:
        from ._history import history as current_history

        history = current_history()
    retries = config.max_retries if config is not None else options.get(
        "max_retries", session.options().get("max_retries"))
    run = ManyRun(items, agent=agent, params=params, n=n, overrides=options if config is None else {},
                  record=record, history=history, retries=retries,
                  concurrency=session.concurrency if concurrency is None else concurrency,
                  rate_limit=session.rate_limit if rate_limit is None else rate_limit)
    return run_with_progress(run, progress=progress)


def run_with_progress(run: ManyRun, *, progress: bool) -> ImageSet:
    """Run ``run`` on the background loop, updating a progress bar from this thread; Ctrl-C cancels.
    ``BudgetError`` first, before any request, when a budget is set and the set could pass it (the set's
    hold is taken here unless the caller took it: :meth:`ManyRun.hold_budget`)."""
    from ._sync import Job

    run.hold_budget()
    job = None
    try:
        job = Job(run.run())
        bar = ProgressBar(len(run.generations), enabled=progress)
        try:
            job.result(poll=0.1, on_poll=lambda: bar.update(run))
        except KeyboardInterrupt:
            # The requests in flight are cancelled and whatever had arrived is recorded (Job.cancel waits):
            # the caller gets every prompt's outcome, and the count in words.
            images = run.results()
            cancelled = sum(1 for r in images.failures if isinstance(r.error, _NotRun))
            failed = len(images.failures) - cancelled
            raise SetInterrupted(
                f"Cancelled (Ctrl-C) after {run.elapsed:.1f} s: {len(images.ok)} of {len(images)} prompt(s) done "
                f"({sum(r.count for r in images.results)} image(s), in the history and on .results)"
                + (f", {failed} failed" if failed else "") + f", {cancelled} cancelled", results=images) from None
        finally:
            bar.close(run)
    finally:
        if job is None or job.done():
            run.release()  # never started, or cancelled before it ran: what it held is given back
    return run.results()


class ProgressBar:
    """tqdm's bar (the notebook widget in Jupyter, text elsewhere): done + failed of total, with
    done / failed / running as its postfix. Updated from the caller's thread only."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = "prompts") -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)

    def update(self, run: Any) -> None:
        if self._bar is None:
            return
        finished = run.done + run.failed
        if finished != self._bar.n:
            self._bar.update(finished - self._bar.n)
        self._bar.set_postfix(done=run.done, failed=run.failed, running=run.running, refresh=True)

    def close(self, run: Any) -> None:
        if self._bar is not None:
            self.update(run)
            self._bar.close()
