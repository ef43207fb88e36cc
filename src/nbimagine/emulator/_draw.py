"""Deterministic stand-in images drawn with Pillow.

The same arguments always give the same bytes: colours and shapes come from a SHA-256 of the prompt,
and nothing depends on time or randomness. Every image carries a visible "nbimagine emulator" label
so that nobody mistakes it for model output. Renders are cached because benchmarks and tests ask for
the same 1024x1024 image many times.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont
    from PIL.ImageFont import ImageFont as BitmapFont

__all__ = ["is_image", "render"]

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MARK = "nbimagine emulator"


def render(prompt: str, width: int, height: int, *, fmt: str = "png", transparent: bool = False,
           base: bytes | None = None, stage: float = 1.0, quality: int | None = None,
           mask: bytes | None = None, texture: bool = False, variant: int = 0) -> bytes:
    """Draw ``prompt`` at ``width`` x ``height`` and encode it as ``fmt`` (png, jpeg, webp).

    ``base``: bytes of an input image; the result is an edit visibly derived from it.
    ``mask``: with ``base``, a PNG whose fully transparent pixels mark the region to change: only
    that region is redrawn (with the caption and the emulator mark inside it); every other pixel
    keeps the base image's value, so a PNG answer of the same size is pixel-identical outside it.
    ``stage`` < 1: a partial (blurred, unfinished) rendering, as sent in partial-image events.
    ``quality``: jpeg/webp compression quality 0-100 (OpenAI's ``output_compression``).
    ``variant``: another drawing of the same prompt (0 is the prompt's own; identical requests differ).
    ``texture``: grain over the whole picture, so that the encoded size is that of a real photo of that
    size (a flat drawing compresses to a fraction of it).
    Raises ``ValueError`` for an unknown format, a bad size or a ``base`` that is not an image.
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported format {fmt!r}; use png, jpeg or webp")
    if not (0 < width <= 8192 and 0 < height <= 8192):
        raise ValueError(f"unsupported size {width}x{height}")
    stage = min(max(float(stage), 0.0), 1.0)
    return _render(prompt, int(width), int(height), fmt, bool(transparent), base, round(stage, 3), quality, mask,
                   bool(texture), int(variant))


def is_image(data: bytes) -> bool:
    """True when Pillow can decode all of ``data`` as an image (a truncated PNG or JPEG is not one).

    The whole image is decoded, as a server that uses it must; Pillow's decompression-bomb limit applies.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


@lru_cache(maxsize=48)
def _render(prompt: str, width: int, height: int, fmt: str, transparent: bool, base: bytes | None,
            stage: float, quality: int | None, mask: bytes | None, texture: bool = False, variant: int = 0) -> bytes:
    salt = f"\x00variant {variant}".encode() if variant else b""
    seed = hashlib.sha256(prompt.encode("utf-8", "surrogatepass") + salt).digest()
    if base is not None and mask is not None:
        img = _masked_edit(base, mask, prompt, seed, width, height)
        if stage < 1.0:
            img = _partial(img, stage, transparent)
        return _encode(img, fmt, transparent or _has_transparency(img), quality)
    img = _edit(base, seed, width, height) if base is not None else _picture(seed, width, height, transparent)
    _caption(img, prompt, seed, edit=base is not None)
    if stage < 1.0:
        img = _partial(img, stage, transparent)
    if texture:
        img = _grain(img, seed)
    _mark(img)
    return _encode(img, fmt, transparent, quality)


def _masked_edit(base: bytes, mask: bytes, prompt: str, seed: bytes, width: int, height: int) -> Image.Image:
    """Inpainting: a new drawing of the prompt inside the mask's fully transparent region only."""
    source = _open_rgba(base, "base image")
    region = _open_rgba(mask, "mask").getchannel("A").point(lambda v: 255 if v == 0 else 0)
    if source.size != (width, height):
        source = ImageOps.fit(source, (width, height), method=Image.Resampling.BILINEAR)
        region = ImageOps.fit(region, (width, height), method=Image.Resampling.NEAREST)
    box = region.getbbox()
    if box is None:  # nothing marked: the real API still answers an image; ours is the input unchanged
        return source
    fill = _picture(seed, width, height, transparent=False)
    inside = Image.blend(source, fill, 0.75)
    patch = inside.crop(box)
    _caption(patch, prompt, seed, edit=False)
    _mark(patch)
    inside.paste(patch, box[:2])
    out = source.copy()
    out.paste(inside, mask=region)
    return out


def _open_rgba(data: bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as src:
            src.load()
            return src.convert("RGBA")
    except Exception as exc:
        raise ValueError(f"the {what} cannot be decoded") from exc


def _has_transparency(img: Image.Image) -> bool:
    return img.mode == "RGBA" and img.getchannel("A").getextrema()[0] < 255


def _colour(seed: bytes, i: int, alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = seed[i % 32], seed[(i + 1) % 32], seed[(i + 2) % 32]
    return (r, g, b, alpha)


def _picture(seed: bytes, width: int, height: int, transparent: bool) -> Image.Image:
    if transparent:
        img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    else:
        # Vertical gradient between two prompt colours: linear_gradient + resize is C-speed.
        mask = Image.linear_gradient("L").resize((width, height))
        top = Image.new("RGBA", (width, height), _colour(seed, 0))
        bottom = Image.new("RGBA", (width, height), _colour(seed, 3))
        img = Image.composite(bottom, top, mask)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))  # shapes blend over the background
    draw = ImageDraw.Draw(layer)
    short = min(width, height)
    for k in range(6):
        b = seed[(4 * k + 6) % 32 :] + seed
        cx, cy = b[0] / 255 * width, b[1] / 255 * height
        r = (0.08 + b[2] / 255 * 0.22) * short
        fill = _colour(seed, 7 * k + 9, 230)
        box = (cx - r, cy - r, cx + r, cy + r)
        shape = b[3] % 3
        if shape == 0:
            draw.ellipse(box, fill=fill, outline=(255, 255, 255, 255), width=max(1, short // 256))
        elif shape == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.regular_polygon((cx, cy, r), 3 + b[4] % 4, rotation=b[5] / 255 * 360, fill=fill)
    img.alpha_composite(layer)
    return img


def _edit(base: bytes, seed: bytes, width: int, height: int) -> Image.Image:
    source = _open_rgba(base, "base image")
    img = ImageOps.fit(source, (width, height), method=Image.Resampling.BILINEAR)
    # A prompt-coloured tint and a diagonal band make the edit visible while keeping the source.
    tint = Image.new("RGBA", (width, height), _colour(seed, 11, 90))
    img = Image.alpha_composite(img, tint)
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    band = max(4, short // 24)
    draw.line((0, height, width, 0), fill=_colour(seed, 17, 200), width=band)
    badge = _font(max(10, short // 18))
    pad = max(4, short // 64)
    draw.rectangle((pad, pad, pad * 3 + _text_width(draw, "EDIT", badge), pad * 3 + badge.size),
                   fill=(200, 30, 30, 230))
    draw.text((pad * 2, pad * 2), "EDIT", font=badge, fill=(255, 255, 255, 255))
    return img


def _caption(img: Image.Image, prompt: str, seed: bytes, *, edit: bool) -> None:
    width, height = img.size
    short = min(width, height)
    size = max(9, short // 22)
    font = _font(size)
    columns = max(8, int(width * 0.8 / (size * 0.55)))
    # Six lines are drawn at most: wrap only what can show (a 4 MB prompt without spaces wrapped whole
    # took a minute).
    text = " ".join(prompt[: columns * 8].split()) or "(empty prompt)"
    lines = textwrap.wrap(text, columns)[:6]
    if len(textwrap.wrap(text, columns)) > 6:
        lines[-1] = lines[-1][: max(0, columns - 1)] + "…"
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))  # a translucent panel blended over the picture
    draw = ImageDraw.Draw(layer)
    line_h = int(size * 1.25)
    box_h = line_h * len(lines) + size
    top = height - box_h - max(size * 2, height // 8) if edit else (height - box_h) // 2
    top = max(0, top)
    draw.rectangle((width * 0.05, top, width * 0.95, top + box_h), fill=(0, 0, 0, 150))
    for i, line in enumerate(lines):
        x = (width - _text_width(draw, line, font)) / 2
        draw.text((x, top + size // 2 + i * line_h), line, font=font, fill=(255, 255, 255, 255))
    img.alpha_composite(layer)


def _partial(img: Image.Image, stage: float, transparent: bool) -> Image.Image:
    """An unfinished rendering: blurred, and the lower part not drawn yet."""
    width, height = img.size
    radius = max(1.0, (1.0 - stage) * min(width, height) / 24)
    small = img.reduce(4) if min(width, height) >= 64 else img  # blur a quarter-size copy: much faster
    blurred = small.filter(ImageFilter.GaussianBlur(radius / (4 if small is not img else 1)))
    out = blurred.resize((width, height), Image.Resampling.BILINEAR)
    cut = int(height * (0.35 + 0.6 * stage))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, cut, width, height), fill=(128, 128, 128, 160 if transparent else 255))
    label = f"rendering {int(stage * 100)}%"
    font = _font(max(9, min(width, height) // 20))
    draw.text(((width - _text_width(draw, label, font)) / 2, cut + font.size // 2), label, font=font,
              fill=(255, 255, 255, 255))
    return out


def _grain(img: Image.Image, seed: bytes) -> Image.Image:
    """Photo-like grain: per-pixel noise (C speed) blended over every channel."""
    noise = Image.effect_noise(img.size, 40 + seed[0] % 16).convert("RGBA")
    noise.putalpha(70)
    out = img.copy()
    out.alpha_composite(noise)
    if img.mode == "RGBA":
        out.putalpha(img.getchannel("A"))
    return out


def _mark(img: Image.Image) -> None:
    """The bottom-right "nbimagine emulator" label that every image carries."""
    width, height = img.size
    font = _font(max(8, min(width, height) // 40))
    draw = ImageDraw.Draw(img)
    tw = _text_width(draw, MARK, font)
    pad = max(2, font.size // 3)
    x1, y1 = width - tw - 3 * pad, height - font.size - 3 * pad
    draw.rectangle((x1, y1, width - pad, height - pad), fill=(0, 0, 0, 200))
    draw.text((x1 + pad, y1 + pad // 2), MARK, font=font, fill=(255, 255, 0, 255))


def _encode(img: Image.Image, fmt: str, transparent: bool, quality: int | None) -> bytes:
    out = io.BytesIO()
    pil_format = FORMATS[fmt]
    if pil_format == "JPEG" or not transparent:
        # No alpha channel: flatten (transparent areas become white, as the real APIs do for jpeg).
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A") if img.mode == "RGBA" else None)
        img = flat
    if pil_format == "PNG":
        img.save(out, "PNG", compress_level=1)  # speed over size: a 1024² render must be cheap
    elif pil_format == "JPEG":
        img.save(out, "JPEG", quality=_clamp(quality, 90))
    else:
        img.save(out, "WEBP", quality=_clamp(quality, 90), method=0)
    return out.getvalue()


def _clamp(quality: int | None, default: int) -> int:
    return default if quality is None else min(max(int(quality), 1), 100)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: FreeTypeFont | BitmapFont) -> float:
    return draw.textlength(text, font=font)


# DejaVu Sans (shipped, Bitstream Vera licence + public domain, see fonts/LICENSE-DejaVu.txt): Latin with
# every accent, Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic and common symbols. Pillow's own
# default font covers ASCII only ("café" drew as "caf" and a box).
_FONT_FILE = Path(__file__).with_name("fonts") / "DejaVuSans.ttf"


@lru_cache(maxsize=32)
def _font(size: int) -> FreeTypeFont:
    try:
        return ImageFont.truetype(str(_FONT_FILE), size)
    except OSError:  # a broken install: still draw, with fewer glyphs
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
