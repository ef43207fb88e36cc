"""The loopback HTTP server behind :class:`~nbimagine.emulator.Emulator`.

Stdlib only (``ThreadingHTTPServer``, HTTP/1.1, daemon threads) so that the emulator starts in a few
milliseconds and needs nothing beyond Pillow. Vendor wire formats live in ``_openai.py`` and
``_gemini.py``; this module owns routing, recording, latency, faults and the byte-level writing of
JSON, raw and SSE answers (including the deliberately broken ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .._cost import register_emulator
from ._faults import FAMILIES, UnknownFaultError, parse_fault

__all__ = ["Answer", "Emulator", "Fault", "RecordedRequest", "Request", "State"]

# Header values that must never be kept in the request log (they are recorded as "***").
_SECRET_HEADERS = frozenset({"authorization", "api-key", "x-goog-api-key"})
_FAULT_TOKEN = re.compile(r"\[fault:([^\]\s]*)\]")
_ERROR_TOKEN = re.compile(r"\[error:(\d{3})\]")
# GET …/responses/{id} and POST …/responses/{id}/cancel (background responses, stored responses).
_RESPONSE_PATH = re.compile(r"^(?:/.*)?/responses/([^/]+?)(/cancel)?$")
_GEMINI_PATH = re.compile(
    r"^(?:/.*)?/(?:v1|v1beta|v1beta1|v1alpha)/(?:projects/[^/]+/locations/[^/]+/)?(?:publishers/[^/]+/)?"
    r"models/[^/:]+:(?:generateContent|streamGenerateContent)$"
)
# How often a handler waiting out ``latency`` looks at its socket to notice a client that left.
_POLL_SECONDS = 0.01
# The limits a real server has, so that no client can exhaust the emulator (all overridable on Emulator()):
MAX_BODY_BYTES = 64 * 1024 * 1024  # larger bodies get HTTP 413 unread (OpenAI: 50 MB of images per request)
IDLE_TIMEOUT = 30.0  # seconds a connection may stay silent (also mid-request: slowloris)
MAX_CONNECTIONS = 512  # connections served at once (idle keep-alive ones count); more get HTTP 503 at once
MAX_RECORDED = 1000  # requests kept in the log (oldest dropped) ...
MAX_RECORDED_BYTES = 128 * 1024 * 1024  # ... and at most this much text in it
_RECORDED_STRING = 4 * 1024 * 1024  # longer strings in the log are summarised (a 20 MB body is not kept)
VARIANTS = 8  # identical requests cycle through this many different drawings (-n 8 gives 8 variants)


@dataclass
class Request:
    """What a route handler receives."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names, real values (unmasked)
    body: bytes
    json: Any  # parsed JSON body, or None
    request_id: str = ""  # the x-request-id this answer will carry (for error messages)


@dataclass
class Answer:
    """What a route handler returns."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None  # JSON body (sent with Content-Length)
    body: bytes | None = None  # raw body instead of json
    # SSE frames, each written and flushed as produced (chunked); None = nothing yet (the client is checked)
    sse: Iterable[bytes | None] | None = None
    # Fault: after this many SSE frames (or, for json/body, after half the bytes) drop the connection.
    break_after: int | None = None


@dataclass
class Fault:
    """One fault to apply to a request; ``name`` is a registered fault (see ``_faults.py``)."""

    name: str
    status: int | None = None
    retry_after: float | None = None
    message: str | None = None
    argument: str | None = None  # "IMAGE_OTHER" in finish:IMAGE_OTHER


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator saw it; secret header values are masked as ``"***"``."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    at: float = 0.0  # time.monotonic() when it arrived


@dataclass
class _Injected:
    fault: Fault
    family: str | None
    remaining: int
    routes: tuple[str, ...]  # the routes that act on it: a request of another route leaves it pending


class State:
    """Shared mutable emulator state. Every method is thread-safe."""

    def __init__(self, latency: float = 0.0, stream_delay: float = 0.0, background_duration: float = 1.0, *,
                 batch_time: float = 2.0, batch_expiry: float | None = None, rate_limit: float | None = None) -> None:
        self.lock = threading.RLock()
        self.store: dict[str, Any] = {}
        self.secret: bytes = os.urandom(32)
        self.requests: list[RecordedRequest] = []
        self.latency = float(latency)
        self.aborted = 0
        self.stream_delay = float(stream_delay)
        self._default_latency = float(latency)
        self._default_stream_delay = float(stream_delay)
        self.background_duration = float(background_duration)
        self._default_background_duration = float(background_duration)
        self._faults: list[_Injected] = []
        self._ids = itertools.count(1)
        self.batch_time = float(batch_time)
        self.batch_expiry = batch_expiry
        self.rate_limit = rate_limit
        self._defaults = (self.batch_time, batch_expiry, rate_limit)
        self._tat = 0.0  # rate limiter: theoretical arrival time of the next request (GCRA)
        self._rejected_keys: set[str] = set()
        self.rate_stats = {"accepted": 0, "rejected": 0, "rejected_again": 0}
        self._variants: dict[str, int] = {}
        self.gate = threading.Event()  # cleared by Emulator.hold(): requests wait before being answered
        self.gate.set()
        self.max_recorded = MAX_RECORDED
        self._recorded_sizes: list[int] = []

    # -- faults -------------------------------------------------------------------------------------
    def inject(self, fault: str, *, family: str | None = None, times: int = 1, status: int | None = None,
               retry_after: float | None = None, message: str | None = None) -> None:
        prefix, _, rest = fault.partition(":")
        if family is None and prefix in FAMILIES:  # "gemini:http" is shorthand for family="gemini"
            family, fault = prefix, rest
        if family is not None and family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
        kind, argument = parse_fault(fault, family)
        if kind.name == "http":
            if argument is not None:
                if not argument.isdigit():
                    raise UnknownFaultError(f"http:STATUS needs a numeric status, not {argument!r}")
                status = status or int(argument)
            if status is None:
                raise ValueError("inject('http') needs status=, e.g. status=500")
        if family is None and len(kind.families) == 1:
            family = kind.families[0]  # a one-vendor fault is never consumed by the other vendor's request
        with self.lock:
            self._faults.append(_Injected(Fault(kind.name, status, retry_after, message, argument), family,
                                          int(times), kind.routes))

    # -- rate limit ---------------------------------------------------------------------------------
    def admit(self, key: bytes) -> float:
        """0 when a request may go on under ``rate_limit`` (requests/minute), else the seconds to wait.

        GCRA with no burst: requests are admitted at most one per ``60 / rate_limit`` seconds. OpenAI
        says per-minute limits may be enforced over shorter periods in proportion ("quantized": 60,000
        requests/minute may be enforced as 1,000 requests/second; rate-limits guide), so the evenly
        spaced form is the strict and realistic one. ``key`` identifies the request body, so that a
        request rejected again on its retry is counted (``rate_stats["rejected_again"]``).
        """
        digest = hashlib.sha256(key).hexdigest()
        with self.lock:
            limit = self.rate_limit
            if not limit:
                return 0.0
            now = time.monotonic()
            interval = 60.0 / float(limit)
            tat = max(self._tat, now)
            if tat - now > 1e-6:
                self.rate_stats["rejected"] += 1
                if digest in self._rejected_keys:
                    self.rate_stats["rejected_again"] += 1
                self._rejected_keys.add(digest)
                return tat - now
            self._tat = tat + interval
            self.rate_stats["accepted"] += 1
            self._rejected_keys.discard(digest)
            return 0.0

    def rate_headers(self, *, azure: bool = False) -> dict[str, str]:
        """The request-limit headers OpenAI sends on every answer, success or 429, as they stand now (its
        rate-limits guide, "Rate limits in headers": ``x-ratelimit-limit-requests``, ``-remaining-requests``,
        ``-reset-requests``, the time until the limit is back to its initial state). Under this limit (no
        burst) one request is allowed at a time, so remaining is 1 or 0 and the reset is the time to the next
        slot. Azure OpenAI sends the remaining count only (its quota guide); Gemini sends none."""
        with self.lock:
            limit = self.rate_limit
            if not limit:
                return {}
            wait = max(0.0, self._tat - time.monotonic())
        remaining = {"x-ratelimit-remaining-requests": "0" if wait > 1e-6 else "1"}
        if azure:
            return remaining
        return {"x-ratelimit-limit-requests": f"{limit:g}", **remaining,
                "x-ratelimit-reset-requests": f"{round(wait * 1000)}ms"}

    def fault(self, family: str, prompt: str, *, route: str) -> Fault | None:
        """Consume an injected fault for ``family`` that ``route`` acts on (a key of ``ROUTES``), else read
        ``[fault:NAME]`` / ``[error:NNN]`` tokens in ``prompt``.

        Raises :class:`UnknownFaultError` for a token naming no fault of ``family``, or one ``route`` does
        not act on (it would be silently ignored otherwise).
        """
        with self.lock:
            for injected in self._faults:
                if injected.remaining > 0 and injected.family in (None, family) and route in injected.routes:
                    injected.remaining -= 1
                    if injected.remaining <= 0:
                        self._faults.remove(injected)
                    return injected.fault
        prompt = prompt or ""
        match = _ERROR_TOKEN.search(prompt)
        if match:
            parse_fault("http", family, route)
            return Fault("http", status=int(match.group(1)))
        match = _FAULT_TOKEN.search(prompt)
        if match:
            kind, argument = parse_fault(match.group(1), family, route)
            status = int(argument) if kind.name == "http" and argument and argument.isdigit() else None
            if kind.name == "http" and status is None:
                raise UnknownFaultError("[fault:http:STATUS] needs a status, e.g. [fault:http:503] or [error:503]")
            return Fault(kind.name, status=status, argument=argument)
        return None

    def pending_faults(self) -> list[tuple[str, str | None, int]]:
        """Injected faults not yet consumed: (name[:argument], family or None, remaining times)."""
        with self.lock:
            return [(f.fault.name + (f":{f.fault.argument}" if f.fault.argument else ""), f.family, f.remaining)
                    for f in self._faults]

    # -- drawing ------------------------------------------------------------------------------------
    def draw(self, prompt: str, width: int, height: int, *, fmt: str = "png", transparent: bool = False,
             base: bytes | None = None, stage: float = 1.0, quality: int | None = None,
             texture: bool = False, variant: int = 0) -> bytes:
        from . import _draw  # Pillow is imported only when an image is really drawn

        return _draw.render(prompt, width, height, fmt=fmt, transparent=transparent, base=base,
                            stage=stage, quality=quality, texture=texture, variant=variant)

    # -- bookkeeping --------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        with self.lock:
            return f"req_emu_{next(self._ids)}"

    def record(self, request: RecordedRequest, size: int = 0) -> None:
        with self.lock:
            if len(self._recorded_sizes) != len(self.requests):  # the list was cleared or trimmed from outside
                self._recorded_sizes = [0] * len(self.requests)
            self.requests.append(request)
            self._recorded_sizes.append(size)
            excess = len(self.requests) - self.max_recorded
            while sum(self._recorded_sizes[max(excess, 0):]) > MAX_RECORDED_BYTES and excess < len(self.requests) - 1:
                excess += 1
            if excess > 0:
                del self.requests[:excess]  # in place: callers may hold a reference to the list
                del self._recorded_sizes[:excess]

    def variant(self, key: str) -> int:
        """Which drawing an identical request gets: real APIs never answer the same image twice, so
        repeated (or concurrent, as with -n 4) identical requests cycle through ``VARIANTS`` drawings."""
        with self.lock:
            count = self._variants.get(key, 0)
            self._variants[key] = count + 1
            if len(self._variants) > 4096:
                self._variants.clear()
            return count % VARIANTS

    def count_abort(self) -> None:
        with self.lock:
            self.aborted += 1

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()  # in place: callers may hold a reference to the list
            self.store.clear()
            self._faults.clear()
            self._variants.clear()
            self.gate.set()
            self.max_recorded = MAX_RECORDED
            self._recorded_sizes.clear()
            self.latency = self._default_latency
            self.stream_delay = self._default_stream_delay
            self.background_duration = self._default_background_duration
            self.aborted = 0
            self.batch_time, self.batch_expiry, self.rate_limit = self._defaults
            self._tat = 0.0
            self._rejected_keys.clear()
            self.rate_stats = {"accepted": 0, "rejected": 0, "rejected_again": 0}


# -- routing -----------------------------------------------------------------------------------------
def _generation_route(path: str) -> bool:
    """The routes a provider's request rate limit applies to (not files, batches or health)."""
    path = path.rstrip("/")
    return (path.endswith(("/responses", "/chat/completions", "/images/generations", "/images/edits"))
            or bool(_GEMINI_PATH.match(path)))


def _rate_limited(request: Request, state: State, wait: float) -> Answer:
    limit = state.rate_limit or 0
    if _GEMINI_PATH.match(request.path.rstrip("/")):
        from ._gemini import rate_limited

        return rate_limited(wait, limit)
    from ._openai import rate_limited as openai_rate_limited

    return openai_rate_limited(wait, limit)


def _route(request: Request, state: State) -> Answer:
    path = request.path.rstrip("/")
    try:
        if path.startswith("/api/projects/"):
            from . import _foundry

            return _foundry.handle(request, state)
        if "/files" in path or "/batches" in path or path.endswith(":batchGenerateContent"):
            from . import _batch

            answer = _batch.route(request, state)
            if answer is not None:
                return answer
        if path.endswith("/responses") or path == "/responses":
            from . import _openai

            return _openai.handle(request, state)
        if path.endswith(("/images/generations", "/images/edits")):
            from . import _images_api

            return _images_api.handle(request, state)
        match = _RESPONSE_PATH.match(path)
        if match:
            from . import _background

            resp_id, cancel = match.groups()
            if cancel:
                return _background.cancel(request, state, resp_id) if request.method == "POST" else _method(request)
            return _background.retrieve(request, state, resp_id) if request.method == "GET" else _method(request)
        if path.endswith("/chat/completions"):
            from . import _openai

            return _openai.handle_chat(request, state)
    except UnknownFaultError as exc:  # a [fault:NAME] token naming no fault: refused, never drawn
        return Answer(400, json={"error": {"message": str(exc), "type": "invalid_request_error", "param": "input",
                                           "code": "unknown_fault"}})
    if _GEMINI_PATH.match(path):
        try:
            from ._gemini import handle
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}._gemini":
                raise
            return Answer(501, json={"error": {"code": 501, "message": "Gemini emulation is not available",
                                               "status": "UNIMPLEMENTED"}})
        try:
            return handle(request, state)
        except UnknownFaultError as exc:
            return Answer(400, json={"error": {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}})
    if request.method == "GET" and path in ("", "/health"):
        with state.lock:  # the rate limit's counts too, for a client in another process (benchmarks)
            stats = dict(state.rate_stats)
        return Answer(json={"emulator": "nbimagine", "status": "ok", "rate_limit": state.rate_limit,
                            "rate_stats": stats})
    return Answer(404, json={"error": {"message": f"The emulator has no route {request.method} {request.path}",
                                       "type": "invalid_request_error", "param": None, "code": "not_found"}})


def _method(request: Request) -> Answer:
    return Answer(405, json={"error": {"message": f"Method {request.method} is not supported on {request.path}.",
                                       "type": "invalid_request_error", "param": None, "code": None}})


class _ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _too_large(path: str, size: int, limit: int) -> Answer:
    """HTTP 413 in the envelope of the vendor the path belongs to."""
    message = f"Request payload size exceeds the limit: {limit} bytes."
    if _GEMINI_PATH.match(path.rstrip("/")):
        return Answer(413, json={"error": {"code": 413, "message": message, "status": "INVALID_ARGUMENT"}})
    return Answer(413, headers={"x-should-retry": "false"}, json={"error": {
        "message": f"{message} The request body is {size} bytes.", "type": "invalid_request_error", "param": None,
        "code": "request_too_large"}})


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 8


def _summarised(value: Any) -> Any:
    """A parsed body for the request log: strings over 4 MB become a short note."""
    if isinstance(value, str):
        return f"<{len(value)} characters, not kept>" if len(value) > _RECORDED_STRING else value
    if isinstance(value, dict):
        return {k: _summarised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_summarised(v) for v in value]
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "nbimagine-emulator"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # socket timeout: a silent client is dropped (slowloris)
        super().setup()
        # Headers and body leave in separate writes; with Nagle's algorithm on, the body would wait for
        # the client's delayed ACK (~40 ms on Linux) and that stall would dominate every emulated call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests and notebooks must not see a request log on stderr

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, _ClientGone):
            self.server.state.count_abort()
            self.close_connection = True
        except (TimeoutError, OSError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # -- request ------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        limit = self.server.max_body
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise _TooLarge(total)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(64)
        length = int(self.headers.get("content-length") or 0)
        if length > limit:
            if length <= 4 * limit:  # read and drop it (no memory kept), so the client sees the 413
                left = length
                while left > 0:
                    left -= len(self.rfile.read(min(left, 1 << 20)) or b"\0" * left)
            raise _TooLarge(length)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = self._read_body()
        except _TooLarge as exc:
            self.close_connection = True  # the rest of the body is never read
            self._write(_too_large(parts.path, exc.size, self.server.max_body), state.next_request_id())
            return
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        request = Request(self.command, parts.path, query, headers, body, parsed, state.next_request_id())
        masked = {k: ("***" if k in _SECRET_HEADERS else v) for k, v in headers.items()}
        recorded = parsed
        if parsed is None and "multipart/form-data" in headers.get("content-type", ""):
            from ._images_api import form_summary  # the log keeps the fields and each file's type and size

            recorded = form_summary(headers["content-type"], body)
        kept = _summarised(recorded)
        state.record(RecordedRequest(self.command, parts.path, query, masked, kept, time.monotonic()),
                     _text_size(kept))

        wait = state.admit(body) if state.rate_limit and _generation_route(parts.path) else 0.0
        if wait > 0:  # a rate-limited request is refused at once, without the model's latency
            self._write(_rate_limited(request, state, wait), request.request_id)
            return
        while not state.gate.wait(_POLL_SECONDS):  # held: answer nothing until released
            if self._client_gone():
                raise _ClientGone
        if state.latency > 0:
            self._wait(state.latency)
        try:
            answer = _route(request, state)
        except Exception as exc:  # an emulator bug: answer it instead of printing a traceback
            answer = Answer(500, headers={"x-should-retry": "false"}, json={"error": {
                "message": f"nbimagine emulator internal error: {exc!r}", "type": "server_error",
                "param": None, "code": "emulator_bug", "traceback": traceback.format_exc()}})
        if state.rate_limit and _generation_route(parts.path) and not _GEMINI_PATH.match(parts.path.rstrip("/")):
            # As OpenAI does, every answer says where the limit stands (taken now, as the answer leaves).
            answer.headers = {**state.rate_headers(azure=parts.path.startswith("/openai/")), **answer.headers}
        self._write(answer, request.request_id)

    def _client_gone(self) -> bool:
        """True when the peer has closed its end (readable socket with nothing to read)."""
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._client_gone():
                raise _ClientGone
            time.sleep(min(_POLL_SECONDS, left))

    # -- answer -------------------------------------------------------------------------------------
    def _start(self, answer: Answer, request_id: str, defaults: dict[str, str]) -> None:
        self.send_response(answer.status)
        headers = {**defaults, "x-request-id": request_id}
        headers.update({k.lower(): v for k, v in answer.headers.items()})
        if self.server.close_connections:
            headers["connection"] = "close"
            self.close_connection = True
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _drop(self) -> None:
        """Fault injection: end the connection abruptly, mid-answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _write(self, answer: Answer, request_id: str) -> None:
        if answer.sse is not None:
            self._start(answer, request_id, {"content-type": "text/event-stream; charset=utf-8",
                                             "cache-control": "no-cache", "transfer-encoding": "chunked"})
            sent = 0
            iterator = iter(answer.sse)
            try:
                for frame in iterator:
                    if frame is None:  # the producer is waiting (a background job's next event)
                        if self._client_gone():
                            raise _ClientGone
                        continue
                    if answer.break_after is not None and sent >= answer.break_after:
                        self._drop()
                        return
                    if sent and self.server.state.stream_delay > 0:
                        self._wait(self.server.state.stream_delay)  # paced frames: visible progress
                    # A client that closed the stream may not make the write fail (kernel buffers),
                    # so look at the socket before each frame to count the abort reliably.
                    if self._client_gone():
                        raise _ClientGone
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                    self.wfile.flush()
                    sent += 1
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            if answer.break_after is not None and sent >= answer.break_after:
                self._drop()
                return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return

        if answer.body is not None:
            payload, ctype = answer.body, "application/octet-stream"
        elif answer.json is not None:
            payload, ctype = json.dumps(answer.json, separators=(",", ":")).encode(), "application/json"
        else:
            payload, ctype = b"", "application/json"
        self._start(answer, request_id, {"content-type": ctype, "content-length": str(len(payload))})
        if self.command == "HEAD":
            return
        if answer.break_after is not None:
            self.wfile.write(payload[: len(payload) // 2])
            self._drop()
            return
        self.wfile.write(payload)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Many SDK connections at once in benchmarks; the default backlog of 5 drops some.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: State, close_connections: bool, *,
                 max_body: int = MAX_BODY_BYTES, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.state = state
        self.close_connections = close_connections
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def close_connections_now(self) -> None:
        with self.lock:
            open_now = list(self.connections)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connection errors are expected (aborted clients, injected drops); never print them

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, at most ``max_connections`` at once; beyond that a 503 at once."""
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                body = (b'{"error":{"message":"The emulator is serving too many connections; retry shortly.",'
                        b'"type":"server_error","param":null,"code":"overloaded"}}')
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                % (len(body), body))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Emulator:
    """A local stand-in for the OpenAI (Responses, Azure) and Gemini (Developer, Vertex) image APIs.

    ``with Emulator() as emu: OpenAI(base_url=emu.openai_base_url, api_key="x")`` — see the package docs.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency: float = 0.0,
                 close_connections: bool = False, stream_delay: float = 0.0,
                 background_duration: float = 1.0, batch_time: float = 2.0,
                 batch_expiry: float | None = None, rate_limit: float | None = None,
                 max_body: int = MAX_BODY_BYTES, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.host = host
        self.port = port
        self.close_connections = close_connections
        self.limits = {"max_body": max_body, "idle_timeout": idle_timeout, "max_connections": max_connections}
        self.state = State(latency, stream_delay, background_duration, batch_time=batch_time,
                           batch_expiry=batch_expiry, rate_limit=rate_limit)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> Emulator:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self.state, self.close_connections, **self.limits)
        self.port = self._server.server_address[1]
        _bypass_proxies_for(self.host)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"nbimagine-emulator-{self.port}", daemon=True)
        self._thread.start()
        register_emulator(self.url)  # its answers are priced as simulated
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        register_emulator(self.url, live=False)
        server.shutdown()
        server.server_close()
        # Pooled keep-alive connections would otherwise keep being served by their threads.
        server.close_connections_now()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, on_ready: Callable[[Emulator], None] | None = None) -> None:
        """Start (if needed) and block until KeyboardInterrupt; used by ``python -m nbimagine.emulator``."""
        self.start()
        if on_ready is not None:
            on_ready(self)
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    # -- addresses ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def azure_endpoint(self) -> str:
        return self.url

    @property
    def foundry_endpoint(self) -> str:
        """A Microsoft Foundry project endpoint (``AIProjectClient(endpoint=...)``); any bearer token works."""
        return self.url + "/api/projects/emulator"

    @property
    def gemini_base_url(self) -> str:
        return self.url

    @property
    def vertex_base_url(self) -> str:
        return self.url

    # -- observation and control --------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        return self.state.requests

    @property
    def latency(self) -> float:
        return self.state.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self.state.latency = float(seconds)

    @property
    def stream_delay(self) -> float:
        """Seconds between SSE frames (0 by default), so partial images arrive visibly one by one."""
        return self.state.stream_delay

    @stream_delay.setter
    def stream_delay(self, seconds: float) -> None:
        self.state.stream_delay = float(seconds)

    @property
    def background_duration(self) -> float:
        """Seconds a background response takes from creation to its end (queued for the first quarter, at most
        0.25 s, then in progress)."""
        return self.state.background_duration

    @background_duration.setter
    def background_duration(self, seconds: float) -> None:
        self.state.background_duration = float(seconds)

    @property
    def batch_time(self) -> float:
        """Seconds a batch takes from creation to its final state (validating 10 %, in_progress 70 %,
        finalizing 20 %): the real service's minutes to hours, compressed."""
        return self.state.batch_time

    @batch_time.setter
    def batch_time(self, seconds: float) -> None:
        self.state.batch_time = float(seconds)

    @property
    def batch_expiry(self) -> float | None:
        """Seconds after which an unfinished batch expires (the real 24 h window); None: never."""
        return self.state.batch_expiry

    @batch_expiry.setter
    def batch_expiry(self, seconds: float | None) -> None:
        self.state.batch_expiry = None if seconds is None else float(seconds)

    @property
    def rate_limit(self) -> float | None:
        """Requests per minute the generation routes admit (429 with retry-after beyond); None: no limit."""
        return self.state.rate_limit

    @rate_limit.setter
    def rate_limit(self, per_minute: float | None) -> None:
        with self.state.lock:
            self.state.rate_limit = None if not per_minute else float(per_minute)
            self.state._tat = 0.0

    @property
    def rate_stats(self) -> dict[str, int]:
        """Rate-limit counters: ``accepted``, ``rejected``, and ``rejected_again`` (a request refused
        again on its retry: what a client with a shared limiter never causes)."""
        with self.state.lock:
            return dict(self.state.rate_stats)

    @property
    def aborted(self) -> int:
        return self.state.aborted

    def inject(self, fault: str, *, times: int = 1, status: int | None = None,
               retry_after: float | None = None, message: str | None = None, family: str | None = None) -> None:
        """Make the next ``times`` matching requests fail with ``fault`` (a name from :func:`fault_kinds`,
        ``NAME:ARG`` for faults that take an argument, e.g. ``"finish:IMAGE_OTHER"``).

        ``family`` ("openai" / "gemini", or the prefix form ``"gemini:http"``) limits the fault to one
        vendor; by default the next request of any vendor the fault exists for takes it.
        Raises :class:`UnknownFaultError` (a ``ValueError``) for an unknown name.
        """
        self.state.inject(fault, family=family, times=times, status=status, retry_after=retry_after,
                          message=message)

    def hold(self) -> None:
        """Keep every request waiting (recorded, unanswered) until :meth:`release`: a test can see what is
        in flight at once, without timing anything."""
        self.state.gate.clear()

    def release(self) -> None:
        self.state.gate.set()

    def reset(self) -> None:
        self.state.reset()

    def __repr__(self) -> str:
        running = "running" if self._server is not None else "stopped"
        return f"<Emulator {self.url} {running}>"


def _bypass_proxies_for(host: str) -> None:
    """Keep this process's SDK traffic to the emulator off any HTTP proxy.

    httpx2 honours HTTP(S)_PROXY, and behind a corporate proxy a request to 127.0.0.1 would be sent
    to the proxy and fail, so loopback joins NO_PROXY / no_proxy (nobody wants loopback proxied).
    """
    wanted = ["127.0.0.1", "localhost", host.strip("[]")]
    for var in ("NO_PROXY", "no_proxy"):
        present = [item.strip() for item in os.environ.get(var, "").split(",") if item.strip()]
        missing = [item for item in dict.fromkeys(wanted) if item not in present]
        if missing:
            os.environ[var] = ",".join(present + missing)
