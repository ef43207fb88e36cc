"""Display bundles: previews stay small, captions say what the image is, notebooks stay small."""

from __future__ import annotations

import base64
import functools
import io

import pytest
from PIL import Image, ImageDraw, ImageFilter

from nbimagine._agent import Reply
from nbimagine._display import (
    PREVIEW_BUDGET,
    caption_for,
    grid_bundle,
    image_bundle,
    preview,
    progress_bundle,
)
from nbimagine.events import BinaryResult


@functools.cache
def photo_like(size: int = 1024, *, alpha: bool = False, fmt: str = "PNG") -> bytes:
    """A detailed image (gradients, shapes and fine noise), much harder to compress than a flat drawing."""
    noise = Image.effect_noise((size, size), 64).convert("L")
    base = Image.merge("RGB", (
        Image.linear_gradient("L").resize((size, size)),
        noise,
        Image.radial_gradient("L").resize((size, size)),
    )).filter(ImageFilter.GaussianBlur(0.6))
    draw = ImageDraw.Draw(base)
    for i in range(0, size, 37):
        draw.ellipse((i, i // 2, i + 90, i // 2 + 60), outline=(255, 255 - i % 255, i % 255), width=3)
    image = base
    if alpha:
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse((size // 8, size // 8, size * 7 // 8, size * 7 // 8), fill=255)
        image = base.convert("RGBA")
        image.putalpha(mask)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_preview_reduces_a_large_png_to_a_budgeted_jpeg():
    source = BinaryResult(photo_like())
    assert len(source.data) > 1_000_000  # the naive embed this replaces
    data, media_type = preview(source)
    assert media_type == "image/jpeg"
    assert max(decode(data).size) <= 768
    assert len(data) <= PREVIEW_BUDGET


def test_preview_keeps_transparency_as_png():
    data, media_type = preview(BinaryResult(photo_like(alpha=True)))
    assert media_type == "image/png"
    image = decode(data)
    assert max(image.size) <= 768
    assert image.convert("RGBA").getpixel((2, 2))[3] == 0  # the transparent corner survived
    assert len(data) <= 2 * PREVIEW_BUDGET


def test_small_displayable_image_is_passed_through_untouched():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 120, 200)).save(buffer, format="JPEG")
    small = BinaryResult(buffer.getvalue())
    assert preview(small) == (small.data, "image/jpeg")


def test_preview_keeps_aspect_ratio():
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((1536, 1024)).convert("RGB").save(buffer, format="PNG")
    image = decode(preview(BinaryResult(buffer.getvalue()))[0])
    assert image.size == (768, 512)
    # Content too detailed for the budget at 768 px is scaled further, never distorted.
    buffer = io.BytesIO()
    Image.effect_noise((1536, 1024), 90).convert("RGB").save(buffer, format="PNG")
    data, _ = preview(BinaryResult(buffer.getvalue()))
    width, height = decode(data).size
    assert width <= 768 and abs(width / height - 1.5) < 0.01 and len(data) <= PREVIEW_BUDGET


def test_caption_has_id_provider_size_format_bytes_time_and_revised_prompt():
    result = BinaryResult(photo_like(256), {"provider": "openai", "model": "gpt-image-1", "history_id": 17,
                                            "revised_prompt": "A red fox, watercolor"})
    caption = caption_for(result, elapsed=8.25)
    head, revised = caption.split("\n")
    assert head.startswith("#17 · openai/gpt-image-1 · 256x256 · PNG · ")
    assert head.endswith(" KB · 8.2 s") or head.endswith(" KB · 8.3 s")
    assert revised == "revised prompt: A red fox, watercolor"


def test_image_bundle_shapes():
    result = BinaryResult(photo_like(), {"provider": "gemini", "model": "gemini-3.1-flash-image"})
    bundle = image_bundle(result, caption="#3 · my <caption>")
    assert set(bundle) == {"image/jpeg", "text/plain"}  # the preview once, no second copy inside HTML
    assert bundle["text/plain"] == "#3 · my <caption>"
    full = image_bundle(result, full=True)
    assert base64.b64decode(full["image/png"]) == result.data


def test_binary_result_and_reply_display_themselves():
    result = BinaryResult(photo_like(512))
    assert "image/jpeg" in result._repr_mimebundle_() or "image/png" in result._repr_mimebundle_()
    reply = Reply(body="Here you go <b>", files=[result], provider="openai", model="gpt-4.1")
    bundle = reply._repr_mimebundle_()
    assert bundle["text/plain"].startswith("Here you go <b>\n")
    two = Reply(body="", files=[result, result])
    html = two._repr_mimebundle_()["text/html"]
    assert "display:grid" in html and html.count("<img") == 2
    empty = Reply(body="Only text.")
    assert empty._repr_mimebundle_()["text/plain"] == "Only text."


def test_grid_previews_are_smaller_than_single_previews():
    result = BinaryResult(photo_like())
    grid = grid_bundle([(result, f"#{i}") for i in range(4)])
    single = image_bundle(result)
    assert len(grid["text/html"]) < 4 * len(single["image/jpeg"])
    assert grid["text/html"].count("<img") == 4


def test_progress_bundle_shows_elapsed_and_partials():
    plain = progress_bundle(3.24, label="Generating")
    assert plain["text/plain"] == "Generating… 3.2 s" and "<img" not in plain["text/html"]
    partial = BinaryResult(photo_like(1024))
    with_partial = progress_bundle(1.0, partials=[partial, None], status=["partial 1", "waiting"])
    assert with_partial["text/html"].count("<img") == 1 and "waiting" in with_partial["text/html"]


def test_a_partial_reduced_once_redraws_the_same_slot_without_pillow():
    from nbimagine._display import progress_preview
    from nbimagine._images import image_size

    partial = BinaryResult(photo_like(1024))
    reduced = progress_preview(partial)  # done once per partial; the slot is redrawn 4 times a second
    assert max(image_size(reduced)) <= 384
    assert progress_bundle(1.0, partials=[reduced]) == progress_bundle(1.0, partials=[partial])




@pytest.mark.parametrize("usd", [float("nan"), float("inf"), 10**400])
def test_a_caption_never_fails_on_a_cost_that_is_not_a_price(usd):
    image = BinaryResult(photo_like(64), {"cost_usd": usd})
    assert "$" not in caption_for(image) and "image/png" in image_bundle(image)
