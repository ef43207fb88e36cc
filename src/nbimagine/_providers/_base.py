"""The one interface every provider module implements.

A provider turns a :class:`Turn` into a stream of events that ends with exactly one
``ReplyEvent``. It owns everything vendor-specific: request building, SDK clients, response
parsing, error mapping, and the opaque ``history`` that lets a reply continue its conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..config import ProviderConfig
from ..errors import ConfigError, ProviderError, UnsupportedToolError, register_secret
from ..events import BinaryResult, ImageInput, StreamEvent

if TYPE_CHECKING:
    from .._agent import Reply

Input = str | ImageInput
ConfigT = TypeVar("ConfigT", bound=ProviderConfig)
# Set while a dry run builds its request: the client whose transport records instead of sending.
_client_override: ContextVar[Any] = ContextVar("nbimagine_client_override", default=None)


@dataclass(frozen=True)
class Turn:
    """One request: the new user inputs plus what came before.

    ``history`` is whatever this provider stored on the previous reply (``None`` for a first turn).
    ``stream`` is True when the caller consumes partial images and text deltas; a provider may use
    a cheaper non-streaming request when it is False. ``mask`` marks (by its fully transparent
    pixels) the region of the first input image to change; each provider checks it with
    ``_masks.prepare_mask`` before its request.
    """

    inputs: Sequence[Input]
    history: Any
    instructions: str | None
    stream: bool
    mask: ImageInput | None = None

    @property
    def images(self) -> list[ImageInput]:
        return [item for item in self.inputs if isinstance(item, ImageInput)]

    @property
    def text(self) -> str:
        return "\n".join(item for item in self.inputs if isinstance(item, str))


BATCH_STATES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                "cancelled")
BATCH_FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class BatchStatus:
    """Where a provider's batch job stands.

    ``state`` uses OpenAI's batch vocabulary for every provider (``openai.types.Batch.status``):
    validating, in_progress, finalizing, completed, failed, expired, cancelling, cancelled; Gemini's
    BATCH_STATE_PENDING is validating, RUNNING in_progress, SUCCEEDED completed. ``raw`` is the
    provider's own word. ``total`` / ``completed`` / ``failed`` count request lines (``None`` when the
    provider does not say yet); ``errors`` are job-level messages (a rejected input file...).
    """

    job_id: str
    state: str
    raw: str
    total: int | None = None
    completed: int | None = None
    failed: int | None = None
    errors: tuple[str, ...] = ()
    output: Any = None  # provider-specific handle on the results (file ids, inline responses)

    @property
    def done(self) -> bool:
        """True once the job can change no more (completed, failed, expired or cancelled)."""
        return self.state in BATCH_FINAL

    def __str__(self) -> str:
        counts = ""
        if self.total is not None:
            failed = f", {self.failed} failed" if self.failed else ""
            counts = f": {self.completed or 0} of {self.total} done{failed}"
        return f"{self.state}{counts}"


@dataclass(frozen=True)
class BatchLine:
    """One request line's outcome: its ``custom_id`` and a ``Reply`` or the ``ProviderError`` it met."""

    custom_id: str
    reply: Reply | None = None
    error: ProviderError | None = None


class Provider(ABC, Generic[ConfigT]):
    name: ClassVar[str]
    # Whether every answer states the request limit (x-ratelimit-limit-requests): then a set whose limit is
    # not known yet sends its first request alone and paces the others from that answer's headers.
    states_rate_limit: ClassVar[bool] = False

    def __init__(self, config: ConfigT, tools: Sequence[object]) -> None:
        self.config = config
        self.tools = list(tools)
        for secret in config.secrets():  # masked wherever a provider might echo them
            register_secret(secret)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self.check_tools()

    def check_tools(self) -> None:
        """Raise :class:`UnsupportedToolError` for a tool this provider cannot run."""
        for tool in self.tools:
            raise UnsupportedToolError(f"{type(self.config).__name__} cannot run {type(tool).__name__}")

    @abstractmethod
    def check_credentials(self) -> None:
        """Raise ``ConfigError`` naming what to set when credentials are missing. No network."""

    @abstractmethod
    def new_client(self, transport: Any = None) -> Any:
        """A fresh async SDK client for the running event loop (``transport``: an ``httpx2`` transport)."""

    def client(self) -> Any:
        override = _client_override.get()
        if override is not None:
            return override
        # Async SDK clients hold connections bound to the loop that created them, so keep one per loop,
        # and close it while that loop still runs: asyncio.run() finalizes async generators before it
        # closes the loop, which is the last moment the client's connections can be shut cleanly.
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            client = self.new_client()
            closer = _close_at_loop_shutdown(client)
            started = loop.create_task(closer.__anext__())  # type: ignore[arg-type]
            entry = self._clients[loop] = (client, closer, started)
        return entry[0]

    def warm_up(self) -> None:
        """Import and prepare what a first request and its answer need (blocking, no I/O).

        Many prompts call it once before the first request: a first request that spends a second
        importing the SDK's modules and building its models would leave late, and its answer would
        hold the event loop while the next requests are due.
        """

    @abstractmethod
    def run(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        """Make the request; yield events; end with one ``ReplyEvent`` whose reply has ``history`` set."""

    @abstractmethod
    def endpoint(self) -> str:
        """The base URL requests go to (from the config or the SDK's environment variables). No network."""

    def describe_request(self, turn: Turn) -> dict[str, Any]:
        """The HTTP request ``run(turn)`` would send (method, url, headers, json; secrets masked), not sent.

        ``run`` itself builds it, through the SDK, against a transport that records the request and answers
        400: so the description is the real request, not a copy of the code that makes one.
        """
        import json

        import httpx2

        from .._sync import run_sync
        from ..errors import ImagineError

        seen: list[Any] = []

        def record(request: Any) -> Any:
            seen.append(request)
            return httpx2.Response(400, json={"error": {
                "code": 400, "status": "INVALID_ARGUMENT", "type": "invalid_request_error",
                "message": "nbimagine dry run: this request was not sent"}})

        async def capture() -> None:
            client = self.new_client(transport=httpx2.MockTransport(record))
            token = _client_override.set(client)
            try:
                async for _ in self.run(turn):
                    pass
            except ImagineError:
                pass
            finally:
                _client_override.reset(token)
                target = getattr(client, "aio", client)
                close = getattr(target, "aclose", None) or getattr(target, "close", None)
                outcome = close() if close else None
                if inspect.isawaitable(outcome):
                    await outcome

        run_sync(capture())
        if not seen:
            raise RuntimeError(f"{type(self).__name__} sent no request to describe")
        request = seen[0]
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/"):
            body: Any = _form_fields(kind, request.content)
        else:
            body = json.loads(request.content) if request.content else None
        return masked_request(request.method, str(request.url), dict(request.headers), body)

    def cost(self, reply: Any) -> Any:
        """The reply's :class:`~nbimagine.Cost` from its usage (None when no price list knows the model)."""
        from .._cost import is_emulated, price

        return price(reply.usage, self.name, simulated=is_emulated(self.endpoint()))

    # --- batch engine (optional) ----------------------------------------------------------------
    # A provider with a batch API overrides all seven. ``batch_request`` is synchronous and does no I/O,
    # so a whole set is checked (against ``batch_limits`` too) before anything is uploaded.

    # (requests, bytes of the JSONL input file) one batch may hold; None = no documented limit.
    batch_limits: ClassVar[tuple[int | None, int | None]] = (None, None)

    def batch_request(self, custom_id: str, turn: Turn) -> dict[str, Any]:
        """One request of a batch (the JSONL line / inline request) for ``turn``."""
        raise ConfigError(f"{type(self.config).__name__} has no batch API in nbimagine; use generate_many() "
                          "(%%imagine --each) to run the set now")

    async def batch_upload(self, data: bytes, *, name: str) -> str:
        """Upload ``data`` (lines of :func:`jsonl_line`) as the input of job ``name``; the file's id."""
        raise NotImplementedError

    async def batch_create(self, file_id: str, *, name: str) -> BatchStatus:
        """Create job ``name`` from an uploaded input file (its answer may be lost: :meth:`batch_find`)."""
        raise NotImplementedError

    async def batch_find(self, name: str, since: float) -> BatchStatus | None:
        """The job created under ``name`` (at ``since``, a Unix time, or later), or None when the provider
        has none: what a create whose answer was lost (a dropped connection, a killed kernel) made."""
        raise NotImplementedError

    async def batch_status(self, job_id: str) -> BatchStatus:
        raise NotImplementedError

    async def batch_cancel(self, job_id: str) -> BatchStatus:
        raise NotImplementedError

    def batch_results(self, status: BatchStatus) -> AsyncIterator[BatchLine]:
        """Every line the finished job reports (successes and per-line failures), in any order."""
        raise NotImplementedError


def jsonl_line(request: dict[str, Any]) -> bytes:
    """One request of a batch as one line of its JSONL input file (UTF-8, newline-terminated)."""
    import json

    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def json_line(raw: str | bytes) -> dict[str, Any] | None:
    """One line of a batch's output file as a JSON object, or None (blank, truncated or not an object:
    such a line names no request, which then shows as missing from the results, never hides the others)."""
    import json

    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


async def _close_at_loop_shutdown(client: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        target = getattr(client, "aio", client)  # google-genai keeps its async side on .aio
        close = getattr(target, "aclose", None) or getattr(target, "close", None)
        if close is not None:
            outcome = close()
            if inspect.isawaitable(outcome):
                await outcome


def result(data: bytes, **metadata: Any) -> BinaryResult:
    """A BinaryResult with ``None`` metadata values dropped."""
    return BinaryResult(data, {k: v for k, v in metadata.items() if v is not None})


UNDECODABLE = "undecodable_image"


def kept(data: bytes, **metadata: Any) -> BinaryResult:
    """Bytes a provider answered as an image that are not one (not PNG, JPEG, WebP or GIF: an error page
    from a proxy, text, a format nbimagine does not read), kept as they came with ``undecodable=True``.

    Once a provider has answered, nothing it sent is dropped: such bytes go on ``files`` with the
    images, and :func:`undecodable_error` names them in the error that carries them.
    """
    return result(data, undecodable=True, **metadata)


def undecodable_error(files: Sequence[BinaryResult], *, provider: str, **kwargs: Any) -> ProviderError | None:
    """``ProviderError`` (code ``undecodable_image``) naming each kept non-image of ``files`` (its place,
    what it looks like, its size), with every file on ``.files``; None when all are images."""
    from .._images import describe

    bad = [f".files[{i}] ({describe(f.data)})" for i, f in enumerate(files) if f.metadata.get("undecodable")]
    if not bad:
        return None
    declared = {f.metadata.get("declared_media_type") for f in files if f.metadata.get("undecodable")} - {None}
    said = f" although declared {', '.join(sorted(map(str, declared)))}" if declared else ""
    return ProviderError(
        f"The answer held {len(bad)} image(s) whose bytes are not a PNG, JPEG, WebP or GIF image{said}: "
        f"{'; '.join(bad)}. They are kept as they came (write them out with .save())",
        provider=provider, code=UNDECODABLE, files=files, **kwargs)


# httpx exception names (httpx and httpx2 share them) by what they mean for the user.
_NEVER_REACHED = ("ConnectError", "ConnectTimeout", "ProxyError", "UnsupportedProtocol", "InvalidURL")
_DROPPED = ("RemoteProtocolError", "ReadError", "WriteError", "CloseError", "ReadTimeout", "WriteTimeout")


# The setting that says where requests go, per provider family (the advice when the API cannot be reached).
_ENDPOINT_SETTING = {"foundry": "project_endpoint", "azure": "azure_endpoint (AZURE_OPENAI_ENDPOINT)"}


def transport_failure(exc: BaseException, provider: str | None = None) -> str | None:
    """What a transport error means, in words, or None when ``exc`` is not one.

    The SDKs wrap httpx's errors (openai's ``APIConnectionError`` says "Connection error." for all of
    them), so the chain is searched for the httpx error that tells "never reached" from "dropped
    mid-answer": a broken stream reached the API, and saying otherwise sends the user after the network.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if name in _NEVER_REACHED:
            setting = _ENDPOINT_SETTING.get(provider or "", "base_url")
            return f"Could not reach the API ({current}); check {setting}, the proxy and the network"
        if name in _DROPPED:
            return f"The connection dropped mid-answer ({current}); run it again"
        current = current.__cause__ or current.__context__
    return None


# How the user changes the retry count from where they are: the Python API's words by default; the
# notebook layer sets its own (a cell option, a panel control) around the requests it makes.
RETRY_ADVICE: ContextVar[str] = ContextVar("nbimagine_retry_advice", default="raise max_retries in the config")
# The last way out when a sign-in (a Microsoft Entra ID token) fails during a request, from where the user is.
SIGN_IN_ADVICE: ContextVar[str] = ContextVar("nbimagine_sign_in_advice", default="pass credential= to the config")


def status_hint(status: int | None) -> str | None:
    """Advice for an HTTP status the SDK has already retried (429, 5xx), or None."""
    if status == 429:
        return ("rate limited or out of quota, even after retrying: wait a minute and try again, "
                f"or {RETRY_ADVICE.get()}")
    if status is not None and status >= 500:
        return "the provider failed on its side, even after retrying: try again in a moment"
    return None


# Told the HTTP status of every response the SDK may retry (429, 5xx...); set by the notebook layer around
# its requests, so that a progress display can say "retrying (1/2) after HTTP 503" instead of waiting in
# silence through the SDK's back-off.
ON_RETRYABLE: ContextVar[Callable[[int], None] | None] = ContextVar("nbimagine_on_retryable", default=None)


def retryable(status: int) -> bool:
    """The statuses both SDKs retry (openai: 408, 409, 429, >= 500; google-genai: 408, 429, 5xx)."""
    return status in (408, 409, 429) or status >= 500


async def _report_retryable(response: Any) -> None:
    callback = ON_RETRYABLE.get()
    if callback is not None and retryable(response.status_code):
        callback(response.status_code)


@dataclass(frozen=True)
class RateHeaders:
    """Where a provider's request limit stood when it answered: ``limit`` (requests per minute),
    ``remaining`` (requests allowed now) and ``reset`` (seconds until the limit is back to its initial
    state); ``None`` for what the answer did not say."""

    limit: float | None = None
    remaining: int | None = None
    reset: float | None = None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration(text: str) -> float | None:
    """OpenAI's reset durations in seconds: ``1s``, ``6m0s``, ``120ms``, ``1h2m3.5s``."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def rate_headers(headers: Any) -> RateHeaders | None:
    """The request-limit headers of an answer (success or 429), or None when it has none.

    OpenAI sends ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests`` and
    ``x-ratelimit-reset-requests`` on every answer (rate-limits guide, "Rate limits in headers",
    https://platform.openai.com/docs/guides/rate-limits); Azure OpenAI the remaining count only;
    Gemini none (its limit comes with a 429's QuotaFailure).
    """
    if headers is None:
        return None
    found: dict[str, Any] = {}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        found["limit"] = float(headers["x-ratelimit-limit-requests"]) or None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        found["remaining"] = int(headers["x-ratelimit-remaining-requests"])
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        found["reset"] = _duration(headers["x-ratelimit-reset-requests"])
    return RateHeaders(**found) if any(v is not None for v in found.values()) else None


# Told the request-limit headers of every answer (see :func:`rate_headers`); set by a set's shared rate
# limiter around its requests, so that it paces them from the first answer on, not from the first 429.
ON_RATE_HEADERS: ContextVar[Callable[[RateHeaders], None] | None] = ContextVar("nbimagine_on_rate_headers",
                                                                              default=None)


async def _report_rate_headers(response: Any) -> None:
    callback = ON_RATE_HEADERS.get()
    if callback is not None:
        found = rate_headers(response.headers)
        if found is not None:
            callback(found)


def http_event_hooks() -> dict[str, list[Any]]:
    """httpx ``event_hooks`` for an SDK's async client (see :data:`ON_RETRYABLE`, :data:`ON_RATE_HEADERS`).
    A response hook runs once the headers are in, before the body is read."""
    return {"response": [_report_retryable, _report_rate_headers]}


def masked_request(method: str, url: str, headers: dict[str, str], body: Any) -> dict[str, Any]:
    """A request for display: credential headers masked, base64 image data shortened, keys redacted."""
    import json

    from ..errors import redact

    secret = re.compile(r"(?i)(authorization|api[-_]?key|token|secret|cookie)")
    shown_headers = {k: ("***" if secret.search(k) else redact(str(v))) for k, v in headers.items()}
    return {"method": method, "url": redact(url), "headers": shown_headers,
            "json": json.loads(redact(json.dumps(_shorten(body), ensure_ascii=False)))}


def _form_fields(content_type: str, content: bytes) -> dict[str, Any]:
    """A multipart body (Images API edits) as its fields; files as ``<name, type, N bytes>``."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + content)
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition") or "?"
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        value: Any = (f"<file {filename}, {part.get_content_type()}, {len(data):,} bytes>" if filename
                      else data.decode("utf-8", "replace"))
        if name in fields:  # repeated fields (image[]) become a list
            previous = fields[name]
            fields[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[name] = value
    return {"multipart/form-data": fields}


_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.{48}).+$", re.S)


def _shorten(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shorten(v) for v in value]
    if isinstance(value, str) and len(value) > 200:
        match = _DATA_URL.match(value)
        if match:
            return f"data:{match[1]};base64,{match[2]}... ({len(value):,} characters)"
        if re.fullmatch(r"[A-Za-z0-9+/=_-]+", value[:2000]):
            return f"{value[:48]}... ({len(value):,} characters of base64)"
    return value
