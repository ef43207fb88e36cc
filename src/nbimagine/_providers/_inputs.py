"""What each provider accepts as input images: one table, read by the providers (checked before the
request) and by the emulator (rejected the same way).

A request the API would refuse fails here first with an :class:`~nbimagine.errors.InputError`; an input
that can be converted without losing anything (a still GIF for Gemini, as PNG) is converted and a
:class:`~nbimagine.errors.InputWarning` says so.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .._images import human_bytes, sniff_media_type
from ..errors import InputError, InputWarning
from ..events import ImageInput

__all__ = ["GEMINI", "GEMINI_IMAGE_LIMITS", "OPENAI", "InputRules", "check_image_count", "check_inputs",
           "image_count_problem", "is_animated_gif"]


@dataclass(frozen=True)
class InputRules:
    provider: str
    media_types: frozenset[str]  # media types accepted inline
    max_images: int  # input images per request
    max_inline_bytes: int  # all inline images of a request (history included), as base64 on the wire
    animated_gif: bool  # whether an animated GIF is accepted
    source: str


# OpenAI docs, "Images and vision" > "Image input requirements": PNG, JPEG, WEBP and non-animated GIF;
# up to 50 MB total payload per request; up to 500 image inputs per request.
OPENAI = InputRules(
    provider="openai",
    media_types=frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"}),
    max_images=500,
    max_inline_bytes=50 * 1024 * 1024,
    animated_gif=False,
    source="OpenAI docs, Images and vision: image input requirements",
)
# Gemini docs, "Image understanding" > "Supported image formats": PNG, JPEG, WEBP, HEIC, HEIF (GIF is
# answered 400 "Unsupported MIME type: image/gif"); inline data at most 20 MB per request; 3,600 images.
GEMINI = InputRules(
    provider="gemini",
    media_types=frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}),
    max_images=3600,
    max_inline_bytes=20 * 1024 * 1024,
    animated_gif=False,
    source="Gemini docs, Image understanding: supported formats and inline data limit",
)


@dataclass(frozen=True)
class ModelImageLimit:
    """How many images one prompt of an image model takes (the edited image and the references sent with
    this request; the conversation's earlier images are not counted)."""

    max_images: int
    refused_on: frozenset[str]  # "gemini" (Developer API), "vertex": above the limit is a 400 there, else a warning
    source: str


# The Gemini image models' own limits. Both documents agree on 14 for the Gemini 3 image models; for 2.5 Flash
# Image the Gemini API calls 3 a recommendation and Vertex AI a maximum, so only Vertex refuses a fourth image.
GEMINI_IMAGE_LIMITS = {
    "gemini-2.5-flash-image": ModelImageLimit(
        3, frozenset({"vertex"}),
        "Gemini API docs, Image generation: 'Gemini 2.5 Flash Image works best with up to 3 images as input'; "
        "Vertex AI model card gemini-2.5-flash-image: 'Maximum images per prompt: 3'"),
    "gemini-3-pro-image": ModelImageLimit(
        14, frozenset({"gemini", "vertex"}),
        "Gemini API docs, Image generation: Gemini 3 Pro Image 'supports up to 14 reference images'; Vertex AI "
        "model card gemini-3-pro-image: 'Maximum images per prompt: 14'"),
    "gemini-3.1-flash-image": ModelImageLimit(
        14, frozenset({"gemini", "vertex"}),
        "Vertex AI model card gemini-3.1-flash-image: 'Maximum images per prompt: 14'"),
}


def image_count_problem(model: str, count: int, *, vertex: bool) -> tuple[str, bool] | None:
    """``(message, refused)`` when ``count`` images in one prompt are more than ``model`` takes, else ``None``.

    ``refused``: the service answers 400 (the client raises ``InputError``); otherwise the request goes
    out with an ``InputWarning`` (the documented number is a recommendation there).
    """
    from .._cost import gemini_family

    family = gemini_family(model)
    limit = GEMINI_IMAGE_LIMITS.get(family) if family else None
    if limit is None or count <= limit.max_images:
        return None
    refused = ("vertex" if vertex else "gemini") in limit.refused_on
    where = "Vertex AI" if vertex else "The Gemini API"
    verb = "accepts at most" if refused else "works best with at most"
    return (f"{count} images in one prompt; {where} {verb} {limit.max_images} for {family} (the edited image and "
            f"the references; source: {limit.source})."), refused


def check_image_count(model: str, count: int, *, vertex: bool) -> None:
    """``InputError`` above a Gemini image model's hard limit, ``InputWarning`` above its recommended one."""
    problem = image_count_problem(model, count, vertex=vertex)
    if problem is None:
        return
    message, refused = problem
    if refused:
        raise InputError(message + " Send fewer reference images, or use gemini-3-pro-image (up to 14).")
    warnings.warn(message + " The request was sent.", InputWarning, stacklevel=4)


def is_animated_gif(data: bytes) -> bool:
    """True for a GIF with more than one frame (read by Pillow, header blocks only)."""
    if sniff_media_type(data) != "image/gif":
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return bool(getattr(image, "is_animated", False))
    except Exception:
        return False


def _gif_to_png(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.save(out, "PNG")  # palette and transparency kept: PNG holds every GIF pixel exactly
    return out.getvalue()


def check_inputs(inputs: Sequence[str | ImageInput], rules: InputRules, *, earlier_inline_bytes: int = 0,
                 earlier_images: int = 0) -> list[str | ImageInput]:
    """``inputs`` as ``rules`` accept them: converted where nothing is lost, else ``InputError``.

    ``earlier_*``: what the conversation already sends again (history), counted against the limits.
    """
    out: list[str | ImageInput] = []
    images = earlier_images
    inline = earlier_inline_bytes
    for item in inputs:
        if isinstance(item, str):
            out.append(item)
            continue
        images += 1
        if item.data is not None:
            media_type = item.media_type or sniff_media_type(item.data)
            if media_type == "image/gif" and is_animated_gif(item.data) and not rules.animated_gif:
                raise InputError(
                    f"{item!r} is an animated GIF; {rules.provider} accepts only still images. Send one frame "
                    "as PNG (e.g. PIL.Image.open(...).save('frame.png'))."
                )
            if media_type not in rules.media_types:
                if media_type == "image/gif":
                    item = ImageInput(data=_gif_to_png(item.data), detail=item.detail)
                    warnings.warn(f"{rules.provider} does not accept GIF: the image was sent as PNG (the same "
                                  "pixels, nothing lost)", InputWarning, stacklevel=4)
                else:
                    accepted = ", ".join(sorted(rules.media_types))
                    raise InputError(f"{rules.provider} does not accept {media_type} images ({item!r}); it accepts "
                                     f"{accepted}. Convert the image first.")
            inline += (len(item.data or b"") + 2) // 3 * 4
        out.append(item)
    if images > rules.max_images:
        raise InputError(f"{images} images in one request; {rules.provider} accepts at most {rules.max_images}.")
    if inline > rules.max_inline_bytes:
        raise InputError(
            f"The images in this request come to {human_bytes(inline)} as base64 (history included); "
            f"{rules.provider} accepts at most {rules.max_inline_bytes // 2**20} MB per request. Send smaller "
            "images or start a new conversation" + (", or upload with the Files API and pass "
                                                    "ImageInput(file_id=...)." if rules.provider == "gemini"
                                                    else ".")
        )
    return out
