"""Background responses on every OpenAI-family route (OpenAI, Azure OpenAI, Foundry projects).

``"background": true`` on ``POST …/responses`` creates a job that runs on the emulator's clock,
not on the connection: ``queued`` for a quarter of ``State.background_duration`` (at most 0.25 s), then
``in_progress``, then ``completed`` (or what a fault says). What the real API offers around it
(OpenAI's background guide, and the SDK's ``responses.retrieve`` / ``responses.cancel``):

- ``GET …/responses/{id}``: the response as it stands now (the full output once it is done);
- ``GET …/responses/{id}?stream=true&starting_after=N``: the job's events after sequence number
  ``N``, each sent when the job reaches it, so a dropped stream resumes where it stopped;
- ``POST …/responses/{id}/cancel``: ``cancelled`` while it runs; a job already over is returned
  unchanged (cancelling is idempotent); a response made without ``background`` is refused with
  400 "Cannot cancel a synchronous response.".

Faults (by name, like every emulator fault): ``background_failed`` (the job ends ``failed`` with a
``server_error``), ``background_cancelled`` (cancelled on the server halfway; its stream ends
without a final event), ``background_result_missing`` (completed, but the retrieved response
holds ``result: null`` for its image calls, as users of the real service report),
``broken_stream`` (the connection drops after the first partial image; the job runs on). An injected
``http`` fault answers the next poll or stream resume with that status (a transient failure to retry).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

from ._server import Answer, Request, State

BACKGROUND_FAULTS = {
    "background_failed": "a background response ends with status 'failed' (server_error)",
    "background_cancelled": "a background response is cancelled on the server halfway through",
    "background_result_missing": "a completed background response, as retrieved, holds no image bytes",
}
# A job waits in the queue for a quarter of its duration, at most this long.
_MAX_QUEUE_TIME = 0.25
# Seconds between two looks at the clock while a stream waits for the job's next event.
_TICK = 0.02


class Job:
    """A background response: its events (numbered from 0) and the moments they become available.

    The answer to the create is the queued response, sent at once as the real service does; the
    events (and so the images) are made on a worker thread meanwhile.
    """

    def __init__(self, plan: Any, state: State, fault: str | None) -> None:
        from . import _openai

        self.resp_id = plan.resp_id
        self.fault = fault
        self.duration = state.background_duration
        self.queued = _openai._response(plan, [], status="queued")
        self.cancelled_at: float | None = None
        self._plan, self._state = plan, state
        self._events: list[dict[str, Any]] = []
        self._final: dict[str, Any] = {}
        self._ready = threading.Event()
        self.started = time.monotonic()
        threading.Thread(target=self._make, name=f"nbimagine-emulator-job-{plan.resp_id[-6:]}", daemon=True).start()

    def _make(self) -> None:
        from . import _openai

        plan = self._plan
        try:
            _, *rest = _openai.event_payloads(plan, self._state)
            events = [{"type": "response.queued", "response": self.queued}, *rest]
            final = events[-1].get("response") or self.queued
            if self.fault == "background_failed":
                message = "The server had an error while processing your request (emulated background failure)."
                final = _openai._response(plan, [], status="failed",
                                          error={"code": "server_error", "message": message})
                events = [*events[:2], {"type": "error", "code": "server_error", "message": message, "param": None},
                          {"type": "response.failed", "response": final}]
            self._events, self._final = [{"type": "response.created", "response": self.queued}, *events], final
        finally:
            self._ready.set()

    def events(self) -> list[dict[str, Any]]:
        self._ready.wait()
        return self._events

    # -- the clock --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def status(self) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        t = self.elapsed()
        if self.fault == "background_cancelled" and t >= self.duration / 2:
            return "cancelled"
        if t < self.queue_time:
            return "queued"
        if t < self.duration or not self._ready.is_set():
            return "in_progress"
        return "failed" if self.fault == "background_failed" else "completed"

    def due(self, index: int) -> float:
        """When event ``index`` is available (seconds after the start): created and queued at once,
        in_progress when the queue time is over, the final event at the end, the rest in between."""
        last = len(self.events()) - 1
        if index <= 1:
            return 0.0
        if index >= last:
            return self.duration
        return self.queue_time + (index - 2) / max(last - 2, 1) * (self.duration - self.queue_time)

    @property
    def queue_time(self) -> float:
        return min(self.duration / 4, _MAX_QUEUE_TIME)

    def event(self, index: int) -> dict[str, Any]:
        if index == 0:  # created and queued need no drawing: they go out at once
            return {"type": "response.created", "response": self.queued}
        if index == 1:
            return {"type": "response.queued", "response": self.queued}
        return self.events()[index]

    def available(self, index: int) -> bool:
        if index <= 1:
            return True
        if not self._ready.is_set():
            return False
        if index >= len(self.events()):
            return False
        if self.status() == "cancelled":
            stop = self.cancelled_at - self.started if self.cancelled_at is not None else self.duration / 2
            return self.due(index) < stop and index < len(self.events()) - 1
        return self.elapsed() >= self.due(index)

    # -- what a client sees -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        status = self.status()
        if status != "completed" and status != "failed":
            return {**self.queued, "status": status}
        body = copy.deepcopy(self._final) if self._ready.wait() else {}
        if self.fault == "background_result_missing":
            for item in body.get("output") or []:
                if item.get("type") == "image_generation_call":
                    item["result"] = None
        return body

    def frames(self, after: int | None) -> Iterator[bytes | None]:
        """SSE frames of events numbered above ``after``, each once it is due; ``None`` while waiting
        (the server looks at the client's socket then)."""
        from ._openai import _frame

        index = 0 if after is None else after + 1
        while index < 2 or not self._ready.is_set() or index < len(self._events):
            if self.available(index):
                payload = self.event(index)
                yield _frame(payload["type"], {"type": payload["type"], "sequence_number": index, **{
                    k: v for k, v in payload.items() if k != "type"}})
                index += 1
            elif self.status() == "cancelled" and self._ready.is_set():
                return  # a cancelled job's stream just ends: there is no "cancelled" stream event
            else:
                time.sleep(_TICK)
                yield None


def create(plan: Any, state: State) -> Answer:
    """Start a job for an accepted request; answer with the queued response (or its stream)."""
    fault = plan.fault.name if plan.fault else None
    job = Job(plan, state, fault)
    with state.lock:
        state.store[f"openai:job:{plan.resp_id}"] = job
    if not plan.parsed.stream:
        return Answer(json=job.queued)
    break_after = None
    if fault == "broken_stream":
        # created, queued, in_progress, item added, .in_progress, .generating, the first partial image
        break_after = 7 if plan.calls and plan.tool.partial_images else 4
    return Answer(sse=job.frames(None), break_after=break_after)


def _job(state: State, resp_id: str) -> Job | None:
    with state.lock:
        return state.store.get(f"openai:job:{resp_id}")


def retrieve(req: Request, state: State, resp_id: str) -> Answer:
    """``GET …/responses/{id}`` (``stream=true`` and ``starting_after`` resume a background stream)."""
    from . import _openai

    job = _job(state, resp_id)
    streaming = req.query.get("stream", "").lower() == "true"
    # An injected fault applies to a poll or a resumed stream as to any request (the prompt's [fault:...]
    # token already fired on the create): an HTTP error is answered here, a broken stream below; the routes
    # decide which faults a poll takes (HTTP only) and which a resumed stream does (HTTP, broken_stream).
    fault = state.fault("openai", "", route="retrieve" if streaming else "poll")
    if fault is not None and fault.name == "http":
        return _openai._http_fault(fault)
    if job is None:
        stored = _openai._stored_response(state, resp_id)
        if stored is None:
            return _not_found(resp_id)
        if streaming:
            return _openai._error(400, "This response cannot be streamed because it was not created with "
                                       "background=true (emulated).", param="stream")
        return Answer(json=_openai._response(stored["plan"], stored["output"], status="completed"))
    if not streaming:
        return Answer(json=job.snapshot())
    after = req.query.get("starting_after")
    try:
        start = int(after) if after not in (None, "") else None
    except ValueError:
        return _openai._error(400, f"Invalid value for 'starting_after': {after!r}. Expected an integer.",
                              param="starting_after", code="invalid_value")
    break_after = 1 if fault and fault.name == "broken_stream" else None
    return Answer(sse=job.frames(start), break_after=break_after)


def cancel(req: Request, state: State, resp_id: str) -> Answer:
    """``POST …/responses/{id}/cancel``."""
    from . import _openai

    job = _job(state, resp_id)
    if job is None:
        if _openai._stored_response(state, resp_id) is not None:
            return _openai._error(400, "Cannot cancel a synchronous response.")
        return _not_found(resp_id)
    with state.lock:
        if job.status() in ("queued", "in_progress"):
            job.cancelled_at = time.monotonic()
    return Answer(json=job.snapshot())


def _not_found(resp_id: str) -> Answer:
    from ._openai import _error

    return _error(404, f"Response with id '{resp_id}' not found.", param="response_id")
