"""The studio's Paint mask / Edit selected, without a browser: the page's messages as ``studio.js`` sends them,
the painter's mask as ``mask_painter.js`` publishes it (a PNG data URL, transparent where the image changes), a
real history and the real SDKs over HTTP to the emulator. ``test_browser_mask.py`` paints with a real mouse."""

from __future__ import annotations

import base64
import io

import pytest
import test_studio
from PIL import Image, ImageChops, ImageDraw
from test_studio import act, generate

from nbimagine._painter import MaskPainter
from nbimagine._widgets import Studio

routed, hist = test_studio.routed, test_studio.hist  # the studio tests' fixtures


# What the front end publishes for a painted rectangle: opaque black, fully transparent inside ``box``.
def painted(size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0, 0))
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_posts(emu) -> list:
    return [r for r in emu.requests if r.method == "POST"]


@pytest.mark.parametrize("provider", ["openai", "openai-images", "azure-images"])
def test_paint_then_edit_changes_only_the_painted_region_and_selects_the_edit(routed, hist, emu, provider):
    routed.use(provider, size="1024x1536")  # not square: the painter keeps the image's own shape
    st = Studio(routed, hist, settings=False)
    generate(st, "a lighthouse on a cliff")
    source = st.selected[0]
    act(st, "mask")
    painter = st.painter
    assert isinstance(painter, MaskPainter) and st.view.painter is painter and st.view.mask_id == source
    assert (painter.natural_width, painter.natural_height) == (1024, 1536) and painter.label == f"#{source}"
    painter.mask_url = painted((1024, 1536), (200, 300, 599, 899))  # the stroke, as the page publishes it
    emu.requests.clear()
    generate(st, "a red door", edit=True)
    assert st.last_error is None, st.last_error
    sent = image_posts(emu)[-1]
    if provider == "openai":
        assert sent.json["tools"][0]["input_image_mask"]["image_url"].startswith("data:image/png;base64,")
    else:
        assert sent.path.endswith("/images/edits") and list(sent.json["files"]) == ["image", "mask"]
    edit = hist.get(st.selected[0])
    before = hist.get(source).image.to_pil().convert("RGB")
    after = edit.image.to_pil().convert("RGB")
    assert ImageChops.difference(before, after).getbbox() == (200, 300, 600, 900)
    # The mask is in the history between image and edit; the painter has done its job and is gone.
    mask = hist.get(edit.params["mask"])
    assert mask.model == "mask" and list(mask.parents) == [source]
    assert [e.id for e in hist.lineage(edit.id)] == [source, mask.id, edit.id]
    assert st.painter is None and st.view.mask_id == 0 and painter.comm is None
    assert "in the mask" not in st.view.activity.get("label", "")
    st.close()


def test_what_cannot_be_edited_with_a_mask_is_said_on_the_page(routed, hist, emu):
    st = Studio(routed, hist, settings=False)
    act(st, "mask")
    assert "Select the image to mask" in st.view.error and st.painter is None
    generate(st, "a fox")
    generate(st, "a wolf")
    st.set_selection([1])
    act(st, "mask")
    assert st.view.error == "" and st.view.mask_id == 1
    emu.requests.clear()
    st.view.prompt = "a hat"
    act(st, "edit")
    assert st.view.error.startswith("Nothing is painted yet") and not st.running
    st.painter.mask_url = painted((1024, 1024), (0, 0, 99, 99))
    st.set_selection([2, 1])
    act(st, "edit")
    assert "The mask is painted on #1" in st.view.error and not st.running
    st.set_selection([1])
    st.painter.mask_url = painted((512, 512), (0, 0, 99, 99))  # another size: a page that went wrong
    act(st, "edit")
    assert "same size" in st.view.error and "\n" not in st.view.error and not st.running
    assert image_posts(emu) == [] and len(hist) == 2  # nothing sent, nothing recorded
    # Close mask: Edit selected edits the whole image again.
    act(st, "unmask")
    assert st.painter is None and st.view.mask_id == 0
    generate(st, "a hat", edit=True)
    assert st.last_error is None and "input_image_mask" not in image_posts(emu)[-1].json["tools"][0]
    st.close()


def test_a_failed_edit_keeps_the_painter_for_another_try(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a fox")
    painter = st.paint_mask(1)
    painter.mask_url = painted((1024, 1024), (10, 10, 200, 200))
    generate(st, "a hat [error:500]", edit=True)
    assert st.view.status["kind"] == "failed" and st.painter is painter and st.view.mask_id == 1
    generate(st, "a hat", edit=True)
    assert st.last_error is None and st.painter is None
    st.close()


def test_paint_mask_puts_its_image_first_and_a_new_painter_replaces_the_old(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a fox")
    generate(st, "a wolf")
    st.set_selection([2, 1])
    first = st.paint_mask(1)
    assert st.selected == [1, 2]  # the masked image is the one an edit changes
    second = st.paint_mask(2)
    assert first.comm is None and st.painter is second and st.view.mask_id == 2 and st.selected == [2, 1]
    st.close()
    assert st.painter is None and second.comm is None


def test_a_missing_image_file_is_said_not_raised(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a fox")
    hist.get(1).path.unlink()
    act(st, "mask")
    assert st.view.error and st.painter is None
    st.close()
