"""Editing from the notebook: ``%%imagine -e REF -r REF --mask REF``, the mask in the history's lineage, and
the Images API as a session provider (``-n`` as one request), through a real ``InteractiveShell``."""

from __future__ import annotations

import io

import pytest
from IPython.core.error import UsageError
from PIL import Image, ImageChops, ImageDraw
from test_magics import imagine  # the `ip` shell fixture is in conftest.py

from nbimagine._session import get_session
from nbimagine.config import OpenAIImagesConfig
from nbimagine.errors import InputWarning


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _mask(size: tuple[int, int], box: tuple[int, int, int, int], *, bw: bool = False) -> bytes:
    if bw:
        image = Image.new("L", size, 0)
        ImageDraw.Draw(image).rectangle(box, fill=255)
    else:
        image = Image.new("RGBA", size, (0, 0, 0, 255))
        ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0, 0))
    return _png(image)


@pytest.fixture(params=["openai-images", "azure-images", "registered"])
def images_provider(request):
    """The Images API by its built-in names, and as a registered config."""
    if request.param != "registered":
        yield request.param
        return
    session = get_session()
    session.register("images", OpenAIImagesConfig(model="gpt-image-2"))
    yield "images"
    session._registered.pop("images", None)


def test_mask_and_refs_from_the_notebook_keep_their_lineage(ip, emu) -> None:
    import nbimagine

    imagine(ip, "--size 1024x1024 -o first", "a house on a hill")
    first = ip.user_ns["first"].files[0]
    ip.user_ns["door"] = _mask((1024, 1024), (400, 500, 600, 900), bw=True)
    ip.user_ns["logo"] = _png(Image.new("RGB", (64, 64), "red"))
    with pytest.warns(InputWarning, match="black-and-white to alpha"):
        imagine(ip, "-e last -r logo --mask door -o edited", "add a red door")
    edited = ip.user_ns["edited"].files[0]
    sent = emu.requests[-1].json
    tool = sent["tools"][0]
    assert tool["input_image_mask"]["image_url"].startswith("data:image/png;base64,")
    images = [p for p in sent["input"][-1]["content"] if p["type"] == "input_image"]
    assert len(images) == 2  # the image to edit, then the reference
    # Only the masked region changed.
    before = first.to_pil().convert("RGB")
    after = edited.to_pil().convert("RGB")
    assert ImageChops.difference(before, after).getbbox() == (400, 500, 601, 901)
    # The history has the mask as an entry of its own, and the edit descends from image and mask.
    history = nbimagine.history()
    entry = history.get(edited.metadata["history_id"])
    mask_entry = history.get(entry.params["mask"])
    assert mask_entry.model == "mask" and list(mask_entry.parents) == [first.metadata["history_id"]]
    assert set(entry.parents) == {first.metadata["history_id"], mask_entry.id}
    assert [e.id for e in history.lineage(entry.id)] == [first.metadata["history_id"], mask_entry.id, entry.id]
    assert mask_entry.image.to_pil().getchannel("A").getextrema() == (0, 255)  # stored as the alpha mask sent


def test_mask_problems_are_one_line_usage_errors_before_any_request(ip, emu) -> None:
    imagine(ip, "--size 1024x1024", "a house")
    emu.reset()
    ip.user_ns["small"] = _mask((256, 256), (0, 0, 10, 10))
    with pytest.raises(UsageError, match="must be the same size"):
        imagine(ip, "-e last --mask small", "add a door")
    with pytest.raises(UsageError, match="--mask needs the image it applies to"):
        imagine(ip, "--mask small", "add a door")
    ip.user_ns["colour"] = _png(Image.new("RGB", (1024, 1024), (200, 20, 20)))
    with pytest.raises(UsageError, match="colour image without transparency"):
        imagine(ip, "-e last --mask colour", "add a door")
    assert emu.requests == []
    with pytest.raises(UsageError, match="-r applies to one generation"):
        ip.run_line_magic("imagine", "use -r last")


def test_background_mode_never_reaches_the_images_apis_background(ip, emu, images_provider) -> None:
    # The Images API has no background responses, and its own `background` is the image's (transparent...):
    # --background-mode was sent there as background=True.
    with pytest.raises(UsageError, match=r"--background-mode .* the Images API answers each request at once"):
        imagine(ip, f"-p {images_provider} --background-mode", "a cat")
    with pytest.raises(UsageError, match="the Images API answers each request at once"):
        ip.run_line_magic("imagine", f"use {images_provider} --background-mode")
    ip.run_line_magic("imagine", "use openai --background-mode")  # a default kept for the Responses API...
    shown = repr(ip.run_line_magic("imagine", f"use {images_provider} --background opaque"))
    assert "inactive" in shown and "background_mode=on" in shown.split("inactive", 1)[1]  # ...shown as kept
    imagine(ip, "--no-history", "a cat")
    sent = [r for r in emu.requests if "/images/" in r.path][-1].json
    assert sent["background"] == "opaque" and sent.get("background") is not True
    assert not [r for r in emu.requests if r.path.endswith("/responses")]


def test_images_api_provider_makes_n_images_in_one_request(ip, emu, images_provider) -> None:
    imagine(ip, f"-p {images_provider} -n 3 --quality low -o rs", "three moons")
    calls = [r for r in emu.requests if "/images/" in r.path]
    assert len(calls) == 1 and calls[0].json["n"] == 3 and calls[0].json["quality"] == "low"
    reply = ip.user_ns["rs"]
    assert len(reply.files) == 3 and all(f.metadata.get("history_id") for f in reply.files)
    import nbimagine

    assert all(e.params.get("n") == 3 for e in nbimagine.history().latest(3))


def test_images_api_provider_edits_with_a_mask(ip, emu, images_provider) -> None:
    imagine(ip, f"-p {images_provider} --size 1024x1024 -o first", "a boat")
    ip.user_ns["sail"] = _mask((1024, 1024), (100, 100, 300, 300))
    imagine(ip, f"-p {images_provider} -e last --mask sail -o edited", "a red sail")
    sent = emu.requests[-1]
    assert sent.path.endswith("/images/edits") and list(sent.json["files"]) == ["image", "mask"]
    before = ip.user_ns["first"].files[0].to_pil().convert("RGB")
    after = ip.user_ns["edited"].files[0].to_pil().convert("RGB")
    assert ImageChops.difference(before, after).getbbox() == (100, 100, 301, 301)


def test_images_api_values_are_checked_by_the_model_rules(ip, emu, images_provider) -> None:
    with pytest.raises(UsageError, match="quality must be one of"):
        imagine(ip, f"-p {images_provider} --quality xhigh", "x")
    assert emu.requests == []
