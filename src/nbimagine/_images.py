"""Facts about image bytes, read from their headers, and decoding them under a memory budget.

Parsing headers ourselves is fast (no Pillow import on the hot path) and turns a corrupt or
truncated image into ``None`` instead of an exception from deep inside a decoder.

:func:`open_reduced` is the one way previews and thumbnails decode an image: the size is read from
the header first; a decompression bomb is refused before any pixel is decoded; JPEG decodes at
1/2, 1/4 or 1/8 scale (draft mode); a PNG too large to decode whole is decoded in bands of rows
and reduced band by band, so a 13000x13000 provider PNG costs tens of MB, not 700 MB. Every
failure is an :class:`~nbimagine.errors.ImageDecodeError`, never a raw Pillow exception.
"""

from __future__ import annotations

import base64
import io
import math
import struct
import warnings
import zlib
from typing import Any

from .errors import ImageDecodeError

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


def looks_complete(data: bytes, media_type: str | None = None) -> bool:
    """Whether the bytes end the way their format ends (PNG IEND, JPEG EOI, GIF trailer, RIFF length).

    A cheap check for images shown without decoding: truncated bytes go through the decoder,
    which then says what is wrong, instead of reaching the frontend as a broken picture.
    """
    media_type = media_type or sniff_media_type(data)
    if media_type == "image/png":
        return data.endswith(b"IEND\xaeB`\x82")
    if media_type == "image/jpeg":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if media_type == "image/gif":
        return data.endswith(b";")
    if media_type == "image/webp":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


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
    """``812 B``, ``48 KB``, ``1.4 MB``, ``3.0 GB``: sizes as captions, reprs and error messages show them."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    if n < 1024**3:
        return f"{n / (1024 * 1024):.1f} MB"
    return f"{n / 1024**3:.1f} GB"


def has_alpha(image: Any) -> bool:
    """True when some pixel of a Pillow image is not fully opaque (an all-opaque RGBA image is not)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return image.getchannel("A").getextrema()[0] < 255
    return "transparency" in image.info


# --- decoding under a budget ---------------------------------------------------------------------

# Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, where it raises instead of
# warning). Nothing above it is decoded at all, whatever the format.
MAX_PIXELS = 178_956_970
# The largest image decoded whole for a preview or thumbnail: 48 MP is 192 MB as RGBA. Above it,
# JPEG decodes at a reduced scale and 8-bit PNG in bands; anything else is refused with a message.
FULL_DECODE_PIXELS = 48_000_000
_BAND_BYTES = 8 * 1024 * 1024  # filtered PNG rows decoded per band
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, MemoryError)


def describe(data: bytes) -> str:
    """``PNG, 1024x1024, 1.4 MB`` (what the bytes are, as far as the header tells); for bytes that are
    not an image, what they look like: ``HTML (not an image), 1.2 KB``."""
    media_type = sniff_media_type(data)
    if media_type:
        kind = EXTENSIONS[media_type].upper().replace("JPG", "JPEG")
    else:
        kind = f"{_looks_like(data)} (not an image)"
    size = image_size(data, media_type) if media_type else None
    return ", ".join([kind, *([f"{size[0]}x{size[1]}"] if size else []), human_bytes(len(data))])


def _looks_like(data: bytes) -> str:
    """A guess at what non-image bytes are (a proxy's error page, a JSON error, text), from their start."""
    head = data[:256].lstrip().lower()
    if not data:
        return "no bytes"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "XML"
    if head[:1] in (b"{", b"["):
        return "JSON?"
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < 4092:  # not merely a character cut at the end of the sample
            return "binary data"
    return "text"


def decode_error(data: bytes, reason: str) -> ImageDecodeError:
    media_type = sniff_media_type(data)
    return ImageDecodeError(f"{describe(data)}: {reason}", media_type=media_type, size_bytes=len(data),
                            dimensions=image_size(data, media_type) if media_type else None)


def check_decodable(data: bytes) -> tuple[int, int]:
    """The ``(width, height)`` of an image that may be decoded at all; ``ImageDecodeError`` otherwise."""
    media_type = sniff_media_type(data)
    if media_type is None:
        raise decode_error(data, "the bytes are not a PNG, JPEG, WebP or GIF image")
    size = image_size(data, media_type)
    if size is None:
        raise decode_error(data, "the image header is missing or corrupt (truncated data?)")
    if size[0] < 1 or size[1] < 1:
        raise decode_error(data, "the header declares an empty image")
    if size[0] * size[1] > MAX_PIXELS:
        raise decode_error(data, f"{size[0] * size[1] / 1e6:.0f} megapixels is above the {MAX_PIXELS / 1e6:.0f} MP "
                                  "decoding limit (a decompression-bomb guard); the bytes are kept as they are")
    return size


def open_full(data: bytes) -> Any:
    """The whole image as a loaded Pillow image; ``ImageDecodeError`` for bombs and broken data."""
    check_decodable(data)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Checked above against the same limit; Pillow's warning between 89 and 179 MP is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Image.DecompressionBombError as exc:
        raise decode_error(data, str(exc)) from None
    except _DECODE_ERRORS as exc:
        raise decode_error(data, f"cannot be decoded ({_reason(exc)})") from None
    return image


def open_reduced(data: bytes, max_side: int) -> Any:
    """A Pillow image of ``data`` whose longest side is at most ``max_side``, decoded in bounded memory.

    First frame of an animation; EXIF orientation is not applied (callers that need it do it).
    Raises ``ImageDecodeError`` (truncated or corrupt data, a bomb, too many pixels to decode).
    """
    width, height = check_decodable(data)
    media_type = sniff_media_type(data)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if media_type == "image/png" and width * height > FULL_DECODE_PIXELS:
                image = _png_in_bands(data, width, height, max_side)
            else:
                image = Image.open(io.BytesIO(data))
                if media_type != "image/jpeg" and width * height > FULL_DECODE_PIXELS:
                    raise decode_error(data, f"{width * height / 1e6:.0f} megapixels is too large to preview "
                                              f"(limit {FULL_DECODE_PIXELS / 1e6:.0f} MP for this format)")
                image = eight_bit(image)
                # reducing_gap: JPEG decodes at 1/2..1/8 scale (draft), others reduce() by an integer
                # factor before the final resampling, which is then cheap.
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
                image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise decode_error(data, str(exc)) from None
    except _DECODE_ERRORS as exc:
        raise decode_error(data, f"cannot be decoded ({_reason(exc)})") from None
    return image


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "truncated" in text or isinstance(exc, (EOFError, zlib.error)):
        return f"truncated or corrupt data: {text}"
    return text


def _png_chunks(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], list[memoryview]]:
    """(IHDR body, the chunks a band needs to decode (PLTE, tRNS), the IDAT bodies)."""
    view = memoryview(data)
    pos, ihdr, extra, idat = 8, b"", [], []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = view[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = bytes(body)
        elif kind in (b"PLTE", b"tRNS"):
            extra.append((kind, bytes(body)))
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    return ihdr, extra, idat


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _band_png(head: bytes, *parts: bytes | memoryview) -> bytes:
    """A PNG of ``head`` (signature and chunks) and ``parts`` (filtered scanlines) as stored deflate
    blocks: one copy, no compression.

    No final deflate block, no Adler-32 trailer and no IDAT checksum: Pillow checks none of them
    and stops once the last row is filled; computing them would cost a fifth of the whole decode.
    """
    pieces: list[bytes | memoryview] = [b"\x78\x01"]
    for part in parts:
        for start in range(0, len(part), 65535):
            piece = part[start:start + 65535]
            pieces += (b"\x00" + struct.pack("<HH", len(piece), 0xFFFF ^ len(piece)), piece)
    size = sum(len(piece) for piece in pieces)
    return b"".join((head, struct.pack(">I", size), b"IDAT", *pieces, bytes(4), _IEND))


_IEND = _chunk(b"IEND", b"")


def _png_in_bands(data: bytes, width: int, height: int, max_side: int, band_bytes: int = _BAND_BYTES) -> Any:
    """Decode a large 8-bit, non-interlaced PNG a band of rows at a time, reducing each band at once.

    Each band is handed to Pillow as a small PNG of its own (stored, not recompressed) whose first
    row is the previous band's last row, unfiltered: Pillow then undoes the row filters in C, and
    peak memory is a few bands instead of the whole image.
    """
    from PIL import Image

    ihdr, extra, idat = _png_chunks(data)
    if len(ihdr) != 13:
        raise decode_error(data, "the PNG header chunk is corrupt")
    depth, colour, interlace = ihdr[8], ihdr[9], ihdr[12]
    if depth != 8 or interlace or colour not in _PNG_CHANNELS:
        raise decode_error(data, f"{width * height / 1e6:.0f} megapixels is too large to preview "
                                  f"(limit {FULL_DECODE_PIXELS / 1e6:.0f} MP for {depth}-bit or interlaced PNG)")
    stride = width * _PNG_CHANNELS[colour] + 1  # + the filter-type byte of each row
    factor = max(1, math.ceil(max(width, height) / (max_side * 2)))
    rows_per_band = max(factor, (band_bytes // stride) // factor * factor)
    mode = {0: "L", 2: "RGB", 3: "RGBA", 4: "LA", 6: "RGBA"}[colour]
    if colour in (0, 2) and any(kind == b"tRNS" for kind, _ in extra):
        mode = "RGBA"
    out = Image.new(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    head = data[:8]
    extra_chunks = b"".join(_chunk(kind, body) for kind, body in extra)
    inflater, inflate_error = _inflater()
    pending = bytearray()
    chunks = iter(idat)
    previous: bytes | None = None
    y = 0
    while y < height:
        rows = min(rows_per_band, height - y)
        need = rows * stride
        try:
            while len(pending) < need:
                if inflater.unconsumed_tail:
                    pending += inflater.decompress(inflater.unconsumed_tail, need - len(pending))
                    continue
                body = next(chunks, None)
                if body is None:
                    ended = y + len(pending) // stride
                    raise decode_error(data, f"truncated or corrupt data: the pixels end at row {ended} of {height}")
                pending += inflater.decompress(body, need - len(pending))
        except inflate_error as exc:
            raise decode_error(data, f"truncated or corrupt data: {exc}") from None
        # The band's first row is the previous band's last row, unfiltered (filter type 0), so that
        # the filters of this band's rows (which refer to the row above) decode.
        above = b"\x00" + previous if previous is not None else b""
        band_ihdr = struct.pack(">II", width, rows + (previous is not None)) + ihdr[8:]
        with memoryview(pending) as view:
            png = _band_png(head + _chunk(b"IHDR", band_ihdr) + extra_chunks, above, view[:need])
        del pending[:need]
        band = Image.open(io.BytesIO(png))
        band.load()
        top = 1 if previous is not None else 0
        previous = band.crop((0, top + rows - 1, width, top + rows)).tobytes()
        if band.mode != mode:
            band = band.convert(mode)
        box = (0, top, width, top + rows)
        out.paste(band.reduce(factor, box=box) if factor > 1 else band.crop(box), (0, y // factor))
        y += rows
    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out


def _inflater() -> tuple[Any, type[Exception]]:
    """``(decompressor, its error class)``: zlib-ng's when installed (inflating the rows is most of
    the work of a huge PNG's preview, and zlib-ng does it 3-10x faster), else the stdlib's zlib."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:  # a platform without a zlib-ng wheel: slower, same results
        return zlib.decompressobj(), zlib.error
    return zlib_ng.decompressobj(), zlib_ng.error


def eight_bit(image: Any) -> Any:
    """``image`` in a mode every step of a preview can take (reduce, resample, PNG, JPEG): 16-bit and 32-bit
    greyscale (a 16-bit PNG opens as ``I;16``) scaled to 8-bit ``L``, CMYK converted to RGB (PNG, WebP and
    GIF cannot hold CMYK). Other modes are returned as they are."""
    if image.mode.startswith(("I", "F")):
        # The top 8 of 16 bits; a plain convert("L") would clip everything above 255 to white.
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "CMYK":
        return image.convert("RGB")
    return image


def for_format(image: Any, fmt: str) -> Any:
    """``image`` ready to be saved as ``fmt`` (``PNG``, ``JPEG``, ``WEBP``, ``GIF``): JPEG flattened (see
    :func:`flattened`), other formats in a mode they can store (see :func:`eight_bit`)."""
    if fmt == "JPEG":
        return flattened(image)
    image = eight_bit(image)
    if fmt == "WEBP" and image.mode not in ("RGB", "RGBA"):
        return image.convert("RGBA" if has_alpha(image) else "RGB")
    return image


def flattened(image: Any, background: tuple[int, int, int] = (255, 255, 255)) -> Any:
    """A Pillow image for a format without alpha (JPEG): transparent pixels composited onto ``background``.

    A plain ``convert("RGB")`` drops the alpha channel and keeps whatever colour the transparent pixels
    happen to hold, usually black.
    """
    image = eight_bit(image)
    if not has_alpha(image):
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    from PIL import Image

    rgba = image.convert("RGBA")
    base = Image.new("RGB", rgba.size, background)
    base.paste(rgba, mask=rgba.getchannel("A"))
    return base
