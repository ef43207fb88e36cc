"""The mask painter's model (the kernel side of the anywidget) and ``%imagine mask``; the browser side is in
``test_browser_mask.py``."""

from __future__ import annotations

import io

import pytest
import traitlets
from IPython.core.error import UsageError
from PIL import Image, ImageChops, ImageDraw
from test_magics import imagine

from nbimagine._images import data_url
from nbimagine._painter import MaskPainter
from nbimagine.events import BinaryResult


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _painted(size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    """What the front end sends: opaque black, transparent where painted."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle(box, fill=(0, 0, 0, 0))
    return data_url(_png(mask), "image/png")


def test_the_painter_shows_a_preview_and_paints_at_full_size() -> None:
    image = BinaryResult(_png(Image.new("RGB", (1536, 1024), "teal")), {"history_id": 7})
    painter = MaskPainter(image)
    assert (painter.natural_width, painter.natural_height) == (1536, 1024)
    assert painter.image.startswith("data:image/") and len(painter.image) < len(image.data) * 2
    assert painter.brush == 96 and painter.tool == "brush"
    assert painter.mask is None and "nothing painted" in repr(painter)
    painter.mask_url = _painted((1536, 1024), (10, 10, 99, 99))
    mask = painter.mask
    assert mask is not None and (mask.width, mask.height) == (1536, 1024)
    assert mask.metadata["painted_on"] == 7 and mask.metadata["kind"] == "mask"
    with pytest.raises(traitlets.TraitError):
        painter.brush = 0
    with pytest.raises(traitlets.TraitError):
        painter.tool = "spray"
    painter.tool = "eraser"


@pytest.mark.parametrize(("size", "brush"), [((3000, 200), 188), ((200, 3000), 188), ((2, 2), 2), ((1, 1), 1),
                                             ((4096, 4096), 256)])
def test_any_shape_gets_a_painter_at_its_own_size(size: tuple[int, int], brush: int) -> None:
    painter = MaskPainter(BinaryResult(_png(Image.new("RGB", size, "teal"))))
    assert (painter.natural_width, painter.natural_height) == size and painter.brush == brush
    painter.mask_url = _painted(size, (0, 0, 0, 0))
    assert (painter.mask.width, painter.mask.height) == size


def test_an_image_too_large_to_paint_is_refused_in_words() -> None:
    from nbimagine._images import image_size
    from nbimagine.errors import InputError

    big = _png(Image.new("1", (5000, 4000)))
    assert image_size(big) == (5000, 4000)
    with pytest.raises(InputError, match=r"5000x4000 .* up to 16\.8 MP"):
        MaskPainter(BinaryResult(big))


def test_imagine_mask_on_an_image_too_large_is_one_line(ip) -> None:
    ip.user_ns["big"] = _png(Image.new("1", (5000, 4000)))
    with pytest.raises(UsageError, match="Resize it first"):
        ip.run_line_magic("imagine", "mask big")


def test_the_widget_ships_its_front_end() -> None:
    painter = MaskPainter(BinaryResult(_png(Image.new("RGB", (64, 64)))))
    assert "export default" in painter._esm and "render" in painter._esm
    assert ".nbi-mask-painter" in painter._css


def test_an_initial_mask_is_handed_to_the_front_end() -> None:
    initial = BinaryResult(_png(Image.new("RGBA", (64, 64), (0, 0, 0, 0))))
    painter = MaskPainter(BinaryResult(_png(Image.new("RGB", (64, 64)))), initial=initial)
    assert painter.initial_mask.startswith("data:image/png;base64,")


def test_imagine_mask_opens_a_painter_and_edits_with_what_is_painted(ip, emu) -> None:
    import nbimagine

    imagine(ip, "--size 1024x1024 -o first", "a boat at sea")
    painter = ip.run_line_magic("imagine", "mask last -o m")
    assert isinstance(painter, MaskPainter) and ip.user_ns["m"] is painter and painter.label == "#1"
    with pytest.raises(UsageError, match="nothing painted yet"):
        imagine(ip, "-e last --mask m", "a red sail")
    painter.mask_url = _painted((1024, 1024), (300, 200, 500, 600))
    imagine(ip, "-e last --mask m -o edited", "a red sail")
    before = ip.user_ns["first"].files[0].to_pil().convert("RGB")
    after = ip.user_ns["edited"].files[0].to_pil().convert("RGB")
    assert ImageChops.difference(before, after).getbbox() == (300, 200, 501, 601)
    h = nbimagine.history()
    edit = h.get(ip.user_ns["edited"].files[0].metadata["history_id"])
    assert [e.id for e in h.lineage(edit.id)] == [1, 2, 3] and h.get(2).model == "mask"
    assert h.get(2).prompt == "mask for #1"


def test_imagine_mask_usage_errors(ip) -> None:
    with pytest.raises(UsageError, match="takes one image"):
        ip.run_line_magic("imagine", "mask")
    with pytest.raises(UsageError, match="variable name"):
        ip.run_line_magic("imagine", "mask last -o 1x")
    with pytest.raises(UsageError, match="Unknown image reference"):
        ip.run_line_magic("imagine", "mask no_such_thing")
