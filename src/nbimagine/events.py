"""What goes into an agent (``ImageInput``) and what comes out (``BinaryResult`` and stream events)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._images import (
    EXTENSIONS,
    SUPPORTED_MEDIA_TYPES,
    b64decode_any,
    human_bytes,
    image_size,
    sniff_media_type,
)
from .errors import InputError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from ._agent import Reply

__all__ = [
    "BinaryResult",
    "ImageEvent",
    "ImageInput",
    "PartialImageEvent",
    "ReplyEvent",
    "StatusEvent",
    "StreamEvent",
    "TextDeltaEvent",
]

# The largest single image any supported provider accepts (OpenAI: 50 MB per request).
# Providers with lower limits check again when they build the request.
MAX_INPUT_BYTES = 50 * 1024 * 1024
_DETAILS = ("low", "high", "auto", "original")
_SUPPORTED = ", ".join(sorted(EXTENSIONS.values()))


class FrozenDict(dict):
    """A dict that refuses changes, so that a result's metadata cannot drift from its bytes."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("BinaryResult.metadata is read-only; copy it with dict(result.metadata)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))


@dataclass(frozen=True, eq=False)
class BinaryResult:
    """One generated image: the raw ``data`` and a read-only ``metadata`` dict.

    ``metadata["media_type"]`` always describes the bytes themselves, whatever the request asked for.
    """

    data: bytes
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise TypeError(f"BinaryResult.data must be bytes, not {type(self.data).__name__}")
        data = bytes(self.data)
        meta = dict(self.metadata)
        sniffed = sniff_media_type(data)
        if sniffed:
            meta["media_type"] = sniffed
            if "width" not in meta or "height" not in meta:
                size = image_size(data, sniffed)
                if size:
                    meta["width"], meta["height"] = size
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "metadata", FrozenDict(meta))

    @property
    def media_type(self) -> str:
        return self.metadata.get("media_type", "application/octet-stream")

    @property
    def width(self) -> int | None:
        return self.metadata.get("width")

    @property
    def height(self) -> int | None:
        return self.metadata.get("height")

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.media_type, "bin")

    @functools.cached_property
    def sha256(self) -> str:
        """The hex sha256 of ``data``, computed once (the display, the history and its metadata all ask)."""
        return hashlib.sha256(self.data).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BinaryResult):
            return NotImplemented
        return self.data == other.data and dict(self.metadata) == dict(other.metadata)

    def __hash__(self) -> int:
        return hash(self.data)

    def save(self, path: str | os.PathLike[str] = ".", *, overwrite: bool = True) -> Path:
        """Write the image and return where it went.

        ``path`` may be a folder (an existing one, or a path ending in ``/``): the file name is then
        chosen (the provider's call id made safe, else the start of the sha256), stays inside that
        folder, and never replaces a file (``-2``, ``-3``... is added; a file that already holds
        these bytes is reused). ``path`` may also be a file name, without an extension (the right
        one is added) or with one that asks for another format (the image is converted, so a
        ``.png`` file always holds PNG bytes; transparency saved as ``.jpg`` is flattened onto white,
        since JPEG has no alpha channel); an existing file of that name is replaced when
        ``overwrite`` (by a rename: a symlink there is replaced, never written through), else
        ``FileExistsError``.
        """
        import io

        from ._files import Folder, safe_name

        target = Path(path).expanduser()
        if target.is_dir() or str(path).endswith(("/", os.sep)):
            # The call id comes from the provider: never a path of its own ("../../x" stays one name here).
            stem = safe_name(str(self.metadata.get("call_id") or ""), fallback=self.sha256[:16], max_bytes=80)
            with Folder.open(target) as folder:
                return target / folder.write_unique(f"{stem}.{self.extension}", self.data, durable=False)
        if _media_type_for_suffix(target.suffix) is None:  # "logo" or "logo.v2": add the real extension
            target = target.with_name(f"{target.name}.{self.extension}")
        wanted = _media_type_for_suffix(target.suffix)
        data = self.data
        if wanted is not None and wanted != self.media_type:
            from ._images import for_format

            fmt = EXTENSIONS[wanted].replace("jpg", "jpeg").upper()
            # JPEG has no alpha channel: transparency becomes white, not black; CMYK or 16-bit images are
            # converted to what the format can hold.
            image = for_format(self.to_pil(), fmt)
            buffer = io.BytesIO()
            image.save(buffer, format=fmt)
            data = buffer.getvalue()
        with Folder.open(target.parent) as folder:
            folder.write(target.name, data, overwrite=overwrite, durable=False)
        return target

    def to_pil(self) -> PILImage:
        """The image as a Pillow ``Image`` (fully loaded).

        Raises ``ImageDecodeError`` for truncated or corrupt data and for decompression bombs
        (above Pillow's own limit of about 179 megapixels); ``data`` is unaffected.
        """
        from ._images import open_full

        return open_full(self.data)

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}, " if self.width else ""
        extra = ", ".join(
            f"{k}={self.metadata[k]!r}" for k in ("provider", "model") if self.metadata.get(k)
        )
        return f"BinaryResult({self.media_type}, {size}{human_bytes(len(self.data))}{', ' if extra else ''}{extra})"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from ._display import image_bundle

        return image_bundle(self)


def _media_type_for_suffix(suffix: str) -> str | None:
    suffix = suffix.lower().lstrip(".")
    if suffix == "jpeg":
        suffix = "jpg"
    return next((mt for mt, ext in EXTENSIONS.items() if ext == suffix), None)


@dataclass(frozen=True, init=False)
class ImageInput:
    """An image to send with a prompt: exactly one of ``url``, ``path``, ``data`` or ``file_id``.

    Paths are read and bytes are checked at construction, so a bad input fails before any request.
    ``media_type`` is taken from the bytes; a wrong label is corrected, not sent.
    """

    url: str | None
    path: Path | None
    data: bytes | None
    media_type: str | None
    file_id: str | None
    detail: str | None

    def __init__(
        self,
        url: str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        data: bytes | None = None,
        media_type: str | None = None,
        file_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        given = [name for name, value in (("url", url), ("path", path), ("data", data), ("file_id", file_id))
                 if value is not None]
        if len(given) != 1:
            raise InputError(
                "ImageInput takes exactly one of url=, path=, data= or file_id= "
                f"(got {', '.join(given) if given else 'none'})"
            )
        if detail is not None and detail not in _DETAILS:
            raise InputError(f"ImageInput detail must be one of {', '.join(_DETAILS)}, not {detail!r}")
        resolved_path = None
        if url is not None:
            if not isinstance(url, str) or not url.strip():
                raise InputError("ImageInput url must be a non-empty string")
            if url.startswith("data:"):
                data, media_type, url = _parse_data_url(url), None, None
        if path is not None:
            resolved_path = Path(path).expanduser()
            if not resolved_path.is_file():
                raise InputError(f"Image file not found: {resolved_path} (check the path, relative to {Path.cwd()})")
            data = read_image_file(resolved_path)
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InputError(f"ImageInput data must be bytes, not {type(data).__name__}")
            data = bytes(data)
            if len(data) > MAX_INPUT_BYTES:
                raise InputError(
                    f"Image data is {human_bytes(len(data))}; the limit is {human_bytes(MAX_INPUT_BYTES)}."
                )
            sniffed = sniff_media_type(data)
            if sniffed is None:
                where = f" in {resolved_path}" if resolved_path else ""
                declared = f" (declared {media_type})" if media_type else ""
                raise InputError(
                    f"Unsupported image type{where}{declared}: the bytes are not {_SUPPORTED}. "
                    "Convert the image to PNG or JPEG first."
                )
            media_type = sniffed
        elif media_type is not None and media_type not in SUPPORTED_MEDIA_TYPES:
            raise InputError(f"Unsupported media_type {media_type!r}; use one of {sorted(SUPPORTED_MEDIA_TYPES)}")
        if file_id is not None and (not isinstance(file_id, str) or not file_id.strip()):
            raise InputError("ImageInput file_id must be a non-empty string such as 'file-abc123'")
        for name, value in (("url", url), ("path", resolved_path), ("data", data), ("media_type", media_type),
                            ("file_id", file_id), ("detail", detail)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_result(cls, result: BinaryResult) -> ImageInput:
        """Feed a generated image straight back in (e.g. for another round of editing)."""
        return cls(data=result.data, media_type=result.media_type)

    def __repr__(self) -> str:
        if self.file_id:
            return f"ImageInput(file_id={self.file_id!r})"
        if self.url:
            return f"ImageInput(url={self.url[:80]!r})"
        source = f"path={str(self.path)!r}, " if self.path else ""
        return f"ImageInput({source}{self.media_type}, {human_bytes(len(self.data or b''))})"


def read_image_file(path: Path, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of ``path``, refused with ``InputError`` when it is larger than ``limit``.

    The size is taken from ``stat`` before anything is read, and at most ``limit + 1`` bytes are
    ever read, so a file that grows meanwhile (or a pipe, or /dev/zero) is refused just the same.
    """
    def too_big(size: str) -> InputError:
        return InputError(f"Image file {path} is {size}; the limit is {human_bytes(limit)}. "
                          "Downscale or compress it first.")

    try:
        size = path.stat().st_size
        if size > limit:
            raise too_big(human_bytes(size))
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"Cannot read image file {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise too_big(f"more than {human_bytes(limit)} (it grew while being read)")
    return data


def check_text(text: str, what: str = "The prompt") -> str:
    """``text`` unchanged, or ``InputError`` when it cannot be sent as UTF-8 (a lone surrogate such as
    ``'\\udce9'``, typically from a file name or bytes decoded with ``errors='surrogateescape'``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end]
        raise InputError(
            f"{what} holds {bad!r} at position {exc.start}, a lone surrogate that cannot be sent as UTF-8 "
            "(usually bytes decoded with errors='surrogateescape', e.g. a file name). Repair it first, e.g. "
            "text.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')."
        ) from None
    return text


def _parse_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header or not payload:
        raise InputError("ImageInput data URLs must be base64 encoded: data:image/png;base64,...")
    try:
        return b64decode_any(payload)
    except ValueError as exc:
        raise InputError(f"ImageInput data URL is not valid base64: {exc}") from None


# --- stream events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PartialImageEvent:
    """An interim rendering while the image is being made (OpenAI partial images, Gemini thought images)."""

    index: int
    image: BinaryResult


@dataclass(frozen=True)
class TextDeltaEvent:
    text: str


@dataclass(frozen=True)
class ImageEvent:
    """A finished image; it is also in the final reply's ``files``, where its metadata adds ``cost_usd``
    (a stream's usage, and so its price, arrives with its last event)."""

    image: BinaryResult


@dataclass(frozen=True)
class StatusEvent:
    """Where a background response stands (``background=True`` configs only).

    ``status`` is the provider's own word: ``"queued"``, ``"in_progress"``, then, rarely seen here
    because the reply or an error follows, a terminal one. ``elapsed`` counts seconds since the
    response was created; ``detail`` says what else happened (e.g. a dropped stream was resumed).
    """

    status: str
    response_id: str | None
    elapsed: float
    detail: str | None = None


@dataclass(frozen=True)
class ReplyEvent:
    """Always the last event of a stream."""

    reply: Reply


StreamEvent = PartialImageEvent | TextDeltaEvent | ImageEvent | StatusEvent | ReplyEvent

