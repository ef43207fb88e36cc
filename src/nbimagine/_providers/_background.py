"""Background responses: create, follow (poll or stream, resuming dropped streams), cancel.

OpenAI's background mode (also served by Azure OpenAI and Foundry): ``background: true`` makes
``responses.create`` return at once with ``status: "queued"``; the response then runs on the
server whether or not a client is connected. This module follows one such response through the
SDK's own calls, as OpenAI's background guide describes them:

- not streaming: ``responses.retrieve(id)`` while the status is ``queued`` or ``in_progress``, the
  pause growing from ``poll_interval / 4`` to ``poll_interval`` (so at most one status request per
  ``poll_interval`` once the job is long, and the result arrives within one interval of the end);
- streaming: every event carries a ``sequence_number``; when the stream drops (connection error,
  client timeout, or an end without a final event) it is resumed with
  ``responses.retrieve(id, stream=True, starting_after=<last number seen>)``, and an event already
  seen is never passed on twice, so partial images are neither repeated nor lost;
- cancelling the ask (task cancellation, Ctrl-C, leaving the stream early) sends
  ``responses.cancel(id)``: a background job keeps running, and billing, if nobody stops it.

Transient failures while following (connection errors, timeouts, 5xx and 429 after the SDK's own
retries) are retried with backoff; after ``_MAX_FAILURES`` in a row without progress the run ends
with a :class:`~nbimagine.errors.BackgroundResponseError` naming the response id.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..errors import BackgroundResponseError, ProviderError
from ..events import StatusEvent, StreamEvent

ACTIVE = frozenset({"queued", "in_progress"})
_FINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})
_STATUS_EVENTS = frozenset({"response.created", "response.queued", "response.in_progress"})
_MAX_FAILURES = 5
_CANCEL_TIMEOUT = 3.0
# How long a cancelled ask waits for an in-flight create to name the response it must cancel.
_CREATE_WAIT = 10.0
# The image call's result is what gets dropped from a retrieved response (reported by users of the
# background mode); the parser marks such a call with this code.
RESULT_MISSING = "image_result_missing"


class BackgroundRun:
    """One background response, followed to its end. ``events()`` yields what the caller sees."""

    def __init__(self, client: Any, parser: Any, *, provider: str, poll_interval: float) -> None:
        self.client = client
        self.parser = parser
        self.provider = provider
        self.poll_interval = poll_interval
        self.response: Any = None  # the last Response object seen (final once events() ends)
        self.response_id: str | None = None
        self.status: str | None = None
        self.cursor: int | None = None  # sequence number of the last stream event passed on
        self._started = time.monotonic()
        self._reported: tuple[str | None, str | None] | None = None
        self._creating: asyncio.Future[Any] | None = None

    # --- public --------------------------------------------------------------------------------

    async def events(self, request: dict[str, Any], *, stream: bool) -> AsyncIterator[StreamEvent]:
        self._started = time.monotonic()
        follow = self._stream(request) if stream else self._poll(request)
        try:
            async for event in follow:
                yield event
        except (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt):
            with _cancelling():
                await self._learn_id_if_created()
                await self.cancel_on_server()
            raise
        finally:
            await follow.aclose()
        self._check_final()

    async def cancel_on_server(self) -> None:
        """``responses.cancel`` for a job still running (bounded: Ctrl-C must not hang)."""
        if self.response_id is None or (self.status is not None and self.status not in ACTIVE):
            return
        try:
            await asyncio.wait_for(self.client.responses.cancel(self.response_id, timeout=_CANCEL_TIMEOUT),
                                   _CANCEL_TIMEOUT + 0.5)
            self.status = "cancelled"
        except Exception as exc:
            warnings.warn(f"nbimagine could not cancel the background response {self.response_id} ({exc!r}); "
                          "it may still run on the server and be billed", RuntimeWarning, stacklevel=2)

    # --- creating ------------------------------------------------------------------------------

    async def _create(self, request: dict[str, Any], *, stream: bool) -> Any:
        """``responses.create`` shielded from cancellation until the service has named the response.

        A cancel that lands while the request is in flight would otherwise leave a job running on the
        server that nobody knows the id of; ``_learn_id_if_created`` finishes this call and cancels it.
        """

        async def create() -> Any:
            if not stream:
                return await self.client.responses.create(**request, background=True)
            opened = await self.client.responses.create(**request, background=True, stream=True)
            try:
                first = await opened.__anext__()  # response.created: it carries the id
            except BaseException:
                await opened.close()
                raise
            return opened, first

        self._creating = asyncio.ensure_future(create())
        # Kept when the await is cancelled, even if the create has just finished: its answer names the job.
        created = await asyncio.shield(self._creating)
        self._creating = None
        return created

    async def _learn_id_if_created(self) -> None:
        creating, self._creating = self._creating, None
        if self.response_id is not None or creating is None:
            return
        try:
            created = await asyncio.wait_for(creating, _CREATE_WAIT)
        except Exception:
            return
        if isinstance(created, tuple):
            opened, first = created
            await opened.close()
            self._seen(getattr(first, "response", None))
        else:
            self._seen(created)

    # --- polling -------------------------------------------------------------------------------

    async def _poll(self, request: dict[str, Any]) -> AsyncIterator[StreamEvent]:
        response = await self._create(request, stream=False)
        self._seen(response)
        if (event := self._status_event()) is not None:
            yield event
        delay = self.poll_interval / 4
        failures = 0
        while self.status in ACTIVE:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_interval)
            try:
                response = await self.client.responses.retrieve(self.response_id)
            except _transient_errors() as exc:
                failures += 1
                self._give_up_after(failures, exc)
                continue
            failures = 0
            self._seen(response)
            if (event := self._status_event()) is not None:
                yield event
        for event in self.parser.parse_output(response.output or []):
            yield event

    # --- streaming -----------------------------------------------------------------------------

    async def _stream(self, request: dict[str, Any]) -> AsyncIterator[StreamEvent]:
        failures = 0
        while True:
            reason = "the stream ended before the response did"
            try:
                if self.response_id is None:
                    stream, first = await self._create(request, stream=True)
                    pending = [first]
                else:
                    after = {"starting_after": self.cursor} if self.cursor is not None else {}
                    stream, pending = await self.client.responses.retrieve(self.response_id, stream=True, **after), []
                try:
                    async for event in _chain(pending, stream):
                        number = getattr(event, "sequence_number", None)
                        if number is not None:
                            if self.cursor is not None and number <= self.cursor:
                                continue  # already passed on before the stream dropped
                            self.cursor = number
                        failures = 0
                        if event.type in _STATUS_EVENTS or event.type in _FINAL_EVENTS:
                            self._seen(event.response)
                        for out in self.parser.feed(event):
                            yield out
                        if event.type in _STATUS_EVENTS and (status := self._status_event()) is not None:
                            yield status
                        if event.type in _FINAL_EVENTS:
                            return
                finally:
                    await stream.close()
            except _transient_errors() as exc:
                if self.response_id is None:
                    raise  # nothing to resume: the service never named the response
                reason = f"the connection broke ({type(exc).__name__})"
            if self.response_id is None:
                raise ProviderError("The stream ended before the service named the background response",
                                    provider=self.provider, files=self.parser.files)
            failures += 1
            self._give_up_after(failures, reason)
            # A job cancelled or failed on the server ends its stream without a final event.
            current = await self._retrieve_quietly()
            if current is not None and current.status not in ACTIVE and current.status != "completed":
                self._seen(current)
                return
            detail = f"stream dropped: {reason}; resuming after event {self.cursor}"
            if (event := self._status_event(detail)) is not None:
                yield event
            await asyncio.sleep(min(self.poll_interval / 4 * 2 ** (failures - 1), self.poll_interval))

    async def _retrieve_quietly(self) -> Any:
        try:
            return await self.client.responses.retrieve(self.response_id)
        except _transient_errors():
            return None

    # --- bookkeeping ---------------------------------------------------------------------------

    def _seen(self, response: Any) -> None:
        if response is None:
            return
        self.response = response
        if self.response_id is None and getattr(response, "id", None):
            self.response_id = response.id
            self.parser.begin(response)
        self.status = getattr(response, "status", None) or self.status

    def _status_event(self, detail: str | None = None) -> StatusEvent | None:
        key = (self.status, detail)
        if self.status is None or key == self._reported:
            return None
        self._reported = key
        return StatusEvent(self.status, self.response_id, time.monotonic() - self._started, detail)

    def _give_up_after(self, failures: int, cause: object) -> None:
        if failures > _MAX_FAILURES:
            raise BackgroundResponseError(
                f"Lost track of the background response {self.response_id} after {_MAX_FAILURES} failed "
                f"attempts (last: {cause}); it may still be running on the server",
                response_id=self.response_id, response_status=self.status, provider=self.provider,
                files=self.parser.files,
            )

    def _check_final(self) -> None:
        """Raise for outcomes the parser cannot see: a server-side cancel, image bytes gone."""
        common = {"response_id": self.response_id, "provider": self.provider, "files": self.parser.files}
        if self.status == "cancelled":
            raise BackgroundResponseError(
                f"The background response {self.response_id} was cancelled on the server before it finished",
                response_status="cancelled", code="cancelled", **common)
        if self.status == "failed" and not self.parser.failures:
            error = getattr(self.response, "error", None)
            self.parser.failures.append((getattr(error, "code", None),
                                         getattr(error, "message", None) or "the background response failed", None))
        missing = [call for code, _, call in self.parser.failures if code == RESULT_MISSING]
        if missing:
            raise BackgroundResponseError(
                f"The background response {self.response_id} completed, but as retrieved it no longer holds the "
                f"image bytes of {', '.join(map(str, missing))}; the service keeps background results only for "
                "a while. Ask again (streaming, or partial_images, receives the bytes as they are made)",
                response_status=self.status, code=RESULT_MISSING, **common)


# Cancels still on their way when the interpreter exits (a script's Ctrl-C ends the process while the
# background loop unwinds): the exit waits for them, up to _EXIT_WAIT seconds in all.
_EXIT_WAIT = 15.0
_pending: set[threading.Event] = set()
_pending_lock = threading.Lock()
_exit_hook = False


@contextlib.contextmanager
def _cancelling() -> Iterator[None]:
    global _exit_hook
    done = threading.Event()
    with _pending_lock:
        _pending.add(done)
        if not _exit_hook:
            atexit.register(_wait_for_cancels)
            _exit_hook = True
    try:
        yield
    finally:
        done.set()
        with _pending_lock:
            _pending.discard(done)


def _wait_for_cancels() -> None:
    deadline = time.monotonic() + _EXIT_WAIT
    with _pending_lock:
        waiting = list(_pending)
    for done in waiting:
        done.wait(max(0.0, deadline - time.monotonic()))


async def _chain(first: list[Any], stream: Any) -> AsyncIterator[Any]:
    for event in first:
        yield event
    async for event in stream:
        yield event


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which a background response is worth following again (not the response's fault)."""
    import openai

    from .openai import _transport_errors

    return (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError, *_transport_errors())
