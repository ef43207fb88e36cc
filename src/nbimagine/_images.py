"""Facts about image bytes, read from their headers: media type and pixel size.

Parsing headers ourselves is fast (no Pillow import on the hot path) and turns a corrupt or
truncated image into ``None`` instead of an exception from deep inside a decoder.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
SUPPORTED_MEDIA_TYPES = frozenset(EXTENSIONS)


def sniff_media_type(data: bytes) -> str | None:
    """The media type the bytes really are (png, jpeg, webp, gif), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def image_size(data: bytes, media_type: str | None = None) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the header is missing or corrupt."""
    media_type = media_type or sniff_media_type(data)
    try:
        if media_type == "image/png":
            if data[12:16] == b"IHDR":
                return struct.unpack(">II", data[16:24])
        elif media_type == "image/gif":
            return struct.unpack("<HH", data[6:10])
        elif media_type == "image/webp":
            return _webp_size(data)
        elif media_type == "image/jpeg":
            return _jpeg_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def b64decode_any(text: str | bytes) -> bytes:
    """Decode base64 in either alphabet (standard or URL-safe), padded or not.

    Raises ``binascii.Error`` on text that is not base64 at all.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii")
    text = text.strip().replace("+", "-").replace("/", "_")
    text += "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text.encode("ascii"))


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def human_bytes(n: int) -> str:
    """``812 B``, ``48 KB``, ``1.4 MB``: sizes as captions, reprs and error messages show them."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def has_alpha(image: Any) -> bool:
    """True when some pixel of a Pillow image is not fully opaque (an all-opaque RGBA image is not)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return image.getchannel("A").getextrema()[0] < 255
    return "transparency" in image.info
