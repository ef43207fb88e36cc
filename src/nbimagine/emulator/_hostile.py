"""Hostile images: what a provider (or a broken proxy) may hand back, to test that nothing downstream
breaks on it. Each is a fault family of the OpenAI (Responses and Images API) and the Gemini routes.

The huge images are built as PNG streams directly (rows are repeated bands, compressed once, the
deflate blocks repeated), so the emulator never holds their pixels: a 30000x30000 bomb costs a few
MB to build, as a real one does.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from functools import lru_cache

__all__ = ["HOSTILE_IMAGES", "MALFORMED_STREAMS", "hostile_image"]

# name -> what the fault does (listed with the emulator's other faults)
HOSTILE_IMAGES: dict[str, str] = {
    "truncated_png": "the final image is a valid PNG header followed by only 60% of its data",
    "truncated_jpeg": "the final image is a JPEG cut after 60% of its bytes (no end-of-image marker)",
    "huge_png": "the final image is a 13000x13000 PNG of about 0.6 MB (169 megapixels once decoded)",
    "bomb_png": "the final image is a 30000x30000 PNG decompression bomb (900 megapixels, a few MB on the wire)",
    "large_png": "the final image is a 20000x20000 PNG (400 megapixels: above the decoding limit, not a bomb)",
    "tiny_png": "the final image is a 1x1 PNG",
    "animated_png": "the final image is an animated PNG (APNG) of 3 frames",
    "cmyk_jpeg": "the final image is a CMYK JPEG (as print tools write them)",
    "gray16_png": "the final image is a 16-bit greyscale PNG",
}

# name -> what the fault does; OpenAI streams only
MALFORMED_STREAMS: dict[str, str] = {
    "partial_index_not_int": "partial-image events carry partial_image_index as a string ('#0'), not an integer",
}


def hostile_image(name: str, draw: Callable[[str], bytes]) -> bytes:
    """The bytes of fault ``name``; ``draw(fmt)`` renders the ordinary image in ``png`` or ``jpeg``."""
    if name == "truncated_png":
        data = draw("png")
        return data[: len(data) * 6 // 10]
    if name == "truncated_jpeg":
        data = draw("jpeg")
        return data[: len(data) * 6 // 10]
    if name == "huge_png":
        return huge_png(13000, 13000)
    if name == "bomb_png":
        return huge_png(30000, 30000, blank=True)
    if name == "large_png":
        return huge_png(20000, 20000, blank=True)
    return _converted(name, draw("png"))


def _converted(name: str, png: bytes) -> bytes:
    """The ordinary drawing in an unusual but valid shape (Pillow: these are rare, not malformed)."""
    import io

    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    if name == "tiny_png":
        image.resize((1, 1)).save(out, "PNG")
    elif name == "animated_png":
        frames = [image, ImageOps.invert(image), image.rotate(90)]
        frames[0].save(out, "PNG", save_all=True, append_images=frames[1:], duration=200, loop=0)
    elif name == "cmyk_jpeg":
        image.convert("CMYK").save(out, "JPEG", quality=90)
    elif name == "gray16_png":
        # 8-bit grey spread over 16 bits (v * 257), as a scanner or a raw converter writes it.
        image.convert("L").convert("I").point(lambda v: v * 257).convert("I;16").save(out, "PNG")
    else:
        raise ValueError(f"unknown hostile image {name!r}")
    return out.getvalue()


@lru_cache(maxsize=4)
def huge_png(width: int, height: int, *, blank: bool = False) -> bytes:
    """A ``width`` x ``height`` RGB PNG made of one band of rows repeated down the image."""
    band_rows = next(r for r in range(min(height, 256), 0, -1) if height % r == 0)
    band = _band(width, band_rows, blank)
    # Identical input after an identical window compresses to identical bytes after a sync flush:
    # compress the band twice and repeat the second block for the rest of the image.
    compressor = zlib.compressobj(9)
    first = compressor.compress(band) + compressor.flush(zlib.Z_SYNC_FLUSH)
    repeat = compressor.compress(band) + compressor.flush(zlib.Z_SYNC_FLUSH)
    tail = compressor.flush(zlib.Z_FINISH)[:-4]  # the final empty block; the checksum is recomputed
    count = height // band_rows
    adler = 1
    for _ in range(count):
        adler = zlib.adler32(band, adler)
    stream = first + repeat * (count - 1) + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", ihdr), _chunk(b"IDAT", stream), _chunk(b"IEND", b"")))


def _band(width: int, rows: int, blank: bool) -> bytes:
    if blank:
        return bytes(rows * (3 * width + 1))
    from PIL import Image, ImageDraw

    from ._draw import MARK

    image = Image.linear_gradient("L").resize((width, rows)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for x in range(0, width, 512):
        draw.rectangle((x, 0, x + 255, rows // 2), fill=(40, 90 + (x // 512) % 120, 200))
        draw.text((x + 8, rows // 2 + 8), MARK, fill=(255, 255, 255))
    raw = image.tobytes()
    line = 3 * width
    return b"".join(b"\x00" + raw[i * line:(i + 1) * line] for i in range(rows))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))
