"""Edit masks: checked and converted before any request, and drawn as a guide where an API has no mask.

OpenAI's rule (Images API ``mask`` and the image tool's ``input_image_mask``): "An additional image
whose fully transparent areas (e.g. where alpha is zero) indicate where image should be edited. Must
be a valid PNG file, less than 4MB, and have the same dimensions as image" (``openai`` SDK,
``types/image_edit_params.py``). The real API answers a mask without alpha with HTTP 400
``invalid_mask_image_format`` "Invalid mask image format - mask image missing alpha channel".

Masks painted elsewhere are often black and white (white = change, the convention of most
inpainting tools). Those are converted to the alpha form, and the conversion is announced with an
:class:`~nbimagine.errors.InputWarning`; a colour image without transparency is refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

from ._image_models import MASK_MAX_BYTES
from ._images import FULL_DECODE_PIXELS, describe, human_bytes, image_size, open_full
from .errors import ImagineError, InputError, InputWarning
from .events import ImageInput

__all__ = ["GUIDE_INSTRUCTION", "PreparedMask", "as_mask_input", "guide_image", "prepare_mask"]

# The Gemini fallback: the mask drawn on a copy of the image, and this instruction after the prompt.
GUIDE_INSTRUCTION = (
    "The image right after the image to edit is a copy of it with the region to change highlighted in magenta "
    "and outlined. Change only that region of the image to edit; keep everything outside it exactly as it is, "
    "and do not draw the magenta highlight or outline."
)
GUIDE_COLOUR = (255, 0, 255)
_GREY_TOLERANCE = 24  # channel spread below which a pixel counts as grey (JPEG noise, anti-aliasing)


@dataclass(frozen=True)
class PreparedMask:
    """A mask ready to send: a PNG whose fully transparent pixels mark the region to edit."""

    input: ImageInput  # PNG bytes, or the caller's file_id / url when it cannot be read locally
    converted: str | None = None  # what was changed, when something was ("black-and-white to alpha", ...)


def as_mask_input(mask: Any) -> ImageInput:
    """An ``ImageInput`` from whatever ``ask(mask=...)`` accepts (the same kinds as images)."""
    from ._agent import normalize_inputs

    if isinstance(mask, str):
        raise InputError("mask= takes an image (ImageInput, BinaryResult, bytes, a pathlib.Path or a PIL image), "
                         "not a string; for a file use ImageInput(path=...)")
    (item,) = normalize_inputs([mask])
    assert isinstance(item, ImageInput)
    return item


def prepare_mask(mask: ImageInput, target: ImageInput | None) -> PreparedMask:
    """Check ``mask`` against the image it applies to (``target``); convert what converts losslessly.

    Raises ``InputError`` when no image is edited, the mask cannot be decoded, is a colour image
    without transparency, marks nothing to edit, is not the size of ``target``, or is 4 MB or more.
    A black-and-white mask (white = change) becomes alpha; a WebP/GIF with alpha becomes PNG; both
    are announced with an ``InputWarning``.
    """
    if target is None:
        raise InputError("A mask needs an image to edit: pass the image too, e.g. ask(prompt, image, mask=mask)")
    if mask.data is None:
        return PreparedMask(mask)  # a file_id or URL: the provider checks it
    from PIL import Image, ImageChops

    # Everything the header tells is checked before a pixel is decoded: a hostile mask (a decompression
    # bomb, a PNG of 40000x40000) costs nothing, since a mask can be no larger than its image.
    target_size = image_size(target.data, target.media_type) if target.data is not None else None
    header_size = image_size(mask.data, mask.media_type) if mask.media_type else None
    if header_size is None:
        raise InputError(f"The mask cannot be decoded ({describe(mask.data)}); save it as a PNG with an alpha "
                         "channel") from None
    _check_same_size(header_size, target_size)
    if mask.media_type == "image/png" and len(mask.data) >= MASK_MAX_BYTES:
        raise _too_big(len(mask.data))
    if header_size[0] * header_size[1] > FULL_DECODE_PIXELS:
        raise InputError(f"The mask is {header_size[0]}x{header_size[1]} ({header_size[0] * header_size[1] / 1e6:.0f} "
                         f"megapixels); nbimagine reads masks up to {FULL_DECODE_PIXELS / 1e6:.0f} MP. Resize the "
                         "image and its mask (OpenAI works at 3840x2160 at most).")
    try:
        image = open_full(mask.data)
    except ImagineError as exc:
        raise InputError(f"The mask cannot be read ({exc}). Save it as a PNG with an alpha channel") from None

    converted = None
    rgba = image.convert("RGBA") if _has_alpha_channel(image) else None
    alpha = rgba.getchannel("A") if rgba is not None else None
    if alpha is not None and alpha.getextrema()[0] < 255:
        lowest = alpha.getextrema()[0]
        if lowest > 0:
            raise InputError(
                f"The mask marks no region to change: OpenAI edits where the mask is fully transparent (alpha 0), "
                f"and its most transparent pixel has alpha {lowest}. Make the region to change fully transparent.")
        if mask.media_type != "image/png":
            converted = f"{mask.media_type} with transparency to PNG"
            png = _png(rgba)
        else:
            png = mask.data
    else:
        rgb = image.convert("RGB")
        r, g, b = rgb.split()
        spread = ImageChops.lighter(ImageChops.difference(r, g), ImageChops.difference(g, b)).getextrema()[1]
        if spread > _GREY_TOLERANCE:
            raise InputError(
                "The mask must be a PNG with an alpha channel (fully transparent where the image should change), "
                "or a black-and-white image (white where it should change); this one is a colour image "
                "without transparency. Paint one with %imagine mask, or make the region to change transparent."
            )
        grey = rgb.convert("L")
        # White (>= 128) marks the region to change: it becomes fully transparent, the rest opaque.
        new_alpha = grey.point(lambda v: 0 if v >= 128 else 255)
        if new_alpha.getextrema()[0] == 255:
            raise InputError("The mask marks no region to change: it has no transparent pixel, and as a "
                             "black-and-white mask it has no white pixel. Mark the region to edit.")
        out = Image.new("RGBA", image.size, (0, 0, 0, 255))
        out.putalpha(new_alpha)
        png = _png(out)
        converted = "black-and-white to alpha (white = change)"
    _check_same_size(tuple(image.size), target_size)  # the header may have told another size (a broken file)
    if len(png) >= MASK_MAX_BYTES:
        raise _too_big(len(png))
    if converted:
        warnings.warn(f"nbimagine converted the mask from {converted}: fully transparent pixels now mark the "
                      "region to change (the form OpenAI's APIs take).", InputWarning, stacklevel=2)
    return PreparedMask(ImageInput(data=png), converted)


def _check_same_size(size: tuple[int, ...], target_size: tuple[int, int] | None) -> None:
    if target_size is not None and tuple(size) != tuple(target_size):
        raise InputError(
            f"The mask is {size[0]}x{size[1]} but the image to edit is {target_size[0]}x{target_size[1]}: they must "
            "be the same size (OpenAI: the mask must 'have the same dimensions as image'). Paint the mask on the "
            "image itself (%imagine mask) or resize it."
        )


def _too_big(size: int) -> InputError:
    return InputError(f"The mask is {human_bytes(size)} as PNG; OpenAI takes masks under "
                      f"{human_bytes(MASK_MAX_BYTES)}. Use a smaller image, or a mask with fewer colours.")


def guide_image(image: bytes, mask_png: bytes) -> bytes:
    """A copy of ``image`` with the mask's transparent region tinted magenta and outlined (PNG).

    For providers without a mask parameter (Gemini): the model sees where to change, and the
    instruction :data:`GUIDE_INSTRUCTION` says what the marking means.
    """
    from PIL import Image, ImageChops, ImageFilter

    with Image.open(io.BytesIO(image)) as opened:
        base = opened.convert("RGBA")
    with Image.open(io.BytesIO(mask_png)) as opened:
        region = opened.convert("RGBA").getchannel("A").point(lambda v: 255 if v == 0 else 0)
    if region.size != base.size:
        region = region.resize(base.size, Image.Resampling.NEAREST)
    width = max(2, min(base.size) // 128)
    grown = region.filter(ImageFilter.MaxFilter(2 * width + 1))
    outline = ImageChops.subtract(grown, region)
    tint = Image.new("RGBA", base.size, (*GUIDE_COLOUR, 255))
    base.paste(Image.blend(base, tint, 0.45), mask=region)
    base.paste(tint, mask=outline)
    return _png(base)


def region_of(mask_png: bytes) -> Any:
    """The region a mask marks for change, as a Pillow ``L`` image (255 = change)."""
    from PIL import Image

    with Image.open(io.BytesIO(mask_png)) as opened:
        return opened.convert("RGBA").getchannel("A").point(lambda v: 255 if v == 0 else 0)


def _has_alpha_channel(image: Any) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", optimize=False, compress_level=6)
    return out.getvalue()
