"""Typed errors. Every message says what went wrong and, where it can, how to fix it.

Messages never contain secrets: provider text passes through :func:`redact` before it is stored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import BinaryResult

__all__ = [
    "BackgroundResponseError",
    "BatchError",
    "BudgetError",
    "ConfigError",
    "ContentPolicyError",
    "HistoryError",
    "ImageDecodeError",
    "ImagineError",
    "ImagineWarning",
    "InputError",
    "InputWarning",
    "ProviderError",
    "SetInterrupted",
    "UnsupportedToolError",
]


class ImagineError(Exception):
    """Base class of every error nbimagine raises on purpose.

    Its text passes through :func:`redact`, and when it leaves an :class:`~nbimagine.Agent` its chain
    (``__cause__`` / ``__context__``: SDK errors holding HTTP requests with credential headers) is cut,
    so that no credential is reachable from it.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    def detach(self) -> ImagineError:
        """Drop the chained exceptions (they may hold credentials); returns ``self``."""
        self.__cause__ = None
        self.__context__ = None
        self.__suppress_context__ = True
        return self


class ConfigError(ImagineError, ValueError):
    """A configuration or parameter is missing or invalid. Raised before any network call."""


class UnsupportedToolError(ConfigError, TypeError):
    """A tool was given to a provider that cannot run it (e.g. the image tool on Chat Completions)."""


class InputError(ImagineError, ValueError):
    """An input (usually an :class:`~nbimagine.events.ImageInput`) cannot be sent as it is."""


class ImageDecodeError(ImagineError, ValueError):
    """Image bytes that cannot be decoded within bounds: truncated or corrupt data, a decompression
    bomb, or more pixels than a preview or thumbnail may decode.

    The bytes themselves are never discarded because of this error: ``media_type``, ``size_bytes``
    and ``dimensions`` (``(width, height)`` from the header, or ``None``) name what they are.
    """

    def __init__(self, message: str, *, media_type: str | None = None, size_bytes: int | None = None,
                 dimensions: tuple[int, int] | None = None) -> None:
        self.media_type = media_type
        self.size_bytes = size_bytes
        self.dimensions = dimensions
        super().__init__(message)


class ImagineWarning(UserWarning):
    """The images are yours, but something after the provider's answer failed (recording them in
    the history, a thumbnail, a preview, the display, a late Ctrl-C). The message says what and how
    to reach the images; the images themselves are displayed and returned as usual."""


class InputWarning(UserWarning):
    """An input was converted before it was sent (e.g. a black-and-white mask to an alpha mask), or a
    parameter is accepted but has no effect. The message says what changed."""


class HistoryError(ImagineError):
    """The image history cannot be read or written as it is.

    ``path`` is the file or folder concerned, ``cause`` the real reason (the underlying error stays
    on ``__cause__``), and the message ends with what to do: usually ``%imagine history --repair``
    (``History.repair()``), ``--no-history`` for the cell, or another folder.
    """

    def __init__(self, message: str, *, path: object = None, cause: str | None = None,
                 fix: str | None = None) -> None:
        self.message = message
        self.path = path
        self.cause = cause
        self.fix = fix
        text = message
        if path is not None:
            text += f" ({path})"
        if cause:
            text += f": {cause}"
        if fix:
            text += f". {fix}"
        super().__init__(redact(text))


class ProviderError(ImagineError):
    """The provider failed, refused, or answered something that cannot be used.

    ``files`` holds every image the provider did make before the failure, so none is lost.
    ``retry_after`` is the wait in seconds the provider asked for (``retry-after-ms`` / ``retry-after``
    headers, Google's ``RetryInfo``); ``rate_limit`` the requests per minute it said apply
    (``x-ratelimit-limit-requests``, Google's ``QuotaFailure.quotaValue``). Both ``None`` when not said.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        files: Sequence[BinaryResult] = (),
        retry_after: float | None = None,
        rate_limit: float | None = None,
    ) -> None:
        self.message = redact(message)
        self.provider = provider
        self.status = status
        self.code = code
        self.request_id = request_id
        self.files = list(files)
        self.retry_after = retry_after
        self.rate_limit = rate_limit
        super().__init__(self.message)

    def __str__(self) -> str:
        parts = []
        if self.provider:
            parts.append(self.provider)
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code:
            parts.append(str(self.code))
        head = f"[{', '.join(parts)}] " if parts else ""
        tail = f" (request id {self.request_id})" if self.request_id else ""
        text = f"{head}{self.message}{tail}"
        if self.files:  # a sentence of its own, whatever the provider's message ended with
            text = text.rstrip() + ("" if text.rstrip().endswith((".", "!", "?")) else ".")
            text += f" {len(self.files)} image(s) made before the failure are in .files."
        return text


class BudgetError(ImagineError):
    """A request was refused before it was sent: it could take spending past a budget.

    ``scope`` is ``"notebook"`` or ``"session"``; ``spent_usd``, ``estimate_usd`` (the estimate's high end,
    None when it cannot be estimated) and ``budget_usd`` are the figures the message gives.
    """

    def __init__(self, message: str, *, scope: str, spent_usd: float, estimate_usd: float | None,
                 budget_usd: float) -> None:
        super().__init__(message)
        self.scope = scope
        self.spent_usd = spent_usd
        self.estimate_usd = estimate_usd
        self.budget_usd = budget_usd


class ContentPolicyError(ProviderError):
    """The provider's safety system blocked the prompt or the image. ``reason`` says why."""

    def __init__(self, message: str, *, reason: str | None = None, **kwargs: Any) -> None:
        self.reason = reason
        super().__init__(message, **kwargs)


class BackgroundResponseError(ProviderError):
    """A background response (``background=True``) could not deliver its images.

    It was cancelled or failed on the server, it completed but the response as retrieved no longer
    holds the image bytes (``code="image_result_missing"``), or it could not be followed any more.
    ``response_id`` names it on the provider's side; ``response_status`` is its last known status
    (``"cancelled"``, ``"failed"``, ``"completed"``...), not to be confused with ``status``, the HTTP one.
    """

    def __init__(self, message: str, *, response_id: str | None = None, response_status: str | None = None,
                 **kwargs: Any) -> None:
        self.response_id = response_id
        self.response_status = response_status
        super().__init__(message, **kwargs)


class BatchError(ProviderError):
    """A batch job ended without completing: ``state`` is ``"failed"``, ``"expired"`` or ``"cancelled"``.

    ``job_id`` names the job; ``results`` (an :class:`~nbimagine.ImageSet`) holds every line that did
    complete, already recorded in the history, and ``files`` their images: nothing paid for is lost.
    """

    def __init__(self, message: str, *, state: str, job_id: str, results: Any = None, **kwargs: Any) -> None:
        self.state = state
        self.job_id = job_id
        self.results = results
        if results is not None:
            kwargs.setdefault("files", results.files)
        super().__init__(message, code=kwargs.pop("code", f"batch_{state}"), **kwargs)


# Keys look like sk-..., sk-proj-..., AIza..., or opaque tokens after "Bearer" / "api-key:".
# Group 1, when present, is a prefix to keep.
_SECRET_PATTERNS = [
    re.compile(r"()\bsk-[A-Za-z0-9_\-*]{4,}"),
    re.compile(r"()\bAIza[0-9A-Za-z_\-]{8,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}"),
    re.compile(r"(?i)((?:api[-_]?key|token)[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._\-]{8,}"),
]
_known_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a configured secret so that it is masked wherever it might be echoed."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


def redact(text: str) -> str:
    """Mask API keys and tokens in ``text``."""
    for secret in sorted(_known_secrets, key=len, reverse=True):  # "p%40ss" before "p@ss"
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "***", text)
    return text


class SetInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a ``KeyboardInterrupt``) stopped an image set (``generate_many``, ``%%imagine --each``).

    Still a ``KeyboardInterrupt``, so a loop or a script stops as it should. ``results`` (an
    :class:`~nbimagine.ImageSet`) holds every prompt in order: those done, with their images (already
    in the history), and the cancelled ones, whose error says so. The message counts them.
    """

    def __init__(self, message: str, *, results: Any) -> None:
        super().__init__(message)
        self.results = results
