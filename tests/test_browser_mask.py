"""The mask painter in a real browser: JupyterLab + Debian's Chromium + Python Playwright, with the emulator.

A notebook generates an image, opens ``%imagine mask last``, and the mouse paints a stroke (with the
size slider, the eraser, invert, undo and clear on the way); then ``%%imagine -e last --mask m`` edits
with that mask, and the kernel checks with pixels that only the painted region changed in the
emulator's answer, and that the history's lineage holds image, mask and edit. The same in the studio:
select a (non-square) image, Paint mask, paint, Edit in the mask; the edit is selected after. Screenshots
go to ``build/test-artifacts/``. Skipped like ``test_browser.py`` when Chromium, JupyterLab or Playwright
is missing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_browser import ARTIFACTS, CHROMIUM, LAUNCH_ARGS, _jupyterlab, pytestmark  # noqa: F401

CELLS = [
    "%load_ext nbimagine",
    "%%imagine --size 512x512\na house on a hill",
    "%imagine mask last -o m",
    "%%imagine -e last --mask m -o edited\nadd a red door",
    "import nbimagine\n"
    "from PIL import ImageChops\n"
    "h = nbimagine.history()\n"
    "entry = h.get(edited.files[0].metadata['history_id'])\n"
    "source = h.get(1).image.to_pil().convert('RGB')\n"
    "result = edited.files[0].to_pil().convert('RGB')\n"
    "region = m.mask.to_pil().getchannel('A').point(lambda v: 255 if v == 0 else 0)\n"
    "changed = ImageChops.difference(source, result).convert('L').point(lambda v: 255 if v else 0)\n"
    "outside = ImageChops.subtract(changed, region).getbbox()\n"
    "print('MASKCHECK', outside, changed.getbbox() is not None, region.getbbox(), sorted(entry.parents),\n"
    "      [e.id for e in h.lineage(entry.id)], h.get(entry.params['mask']).model)",
]


@contextlib.contextmanager
def _notebook(tmp_path: Path, cells_source: list[str],
              failure: str) -> Iterator[tuple[Any, Any, Callable[[int], None]]]:
    """JupyterLab with ``cells_source`` open in Chromium: ``(page, cells, run)``; a screenshot named ``failure``
    is left in ``build/test-artifacts/`` if the body fails."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / failure).unlink(missing_ok=True)
    with _jupyterlab(tmp_path, cells_source) as (base, token, _root), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        try:
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            page.goto(f"{base}/lab/tree/e2e.ipynb?token={token}")
            page.wait_for_function("""() => {
                const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return k && k.connectionStatus === 'connected' && k.status === 'idle'; }""", timeout=60_000)
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(cells).to_have_count(len(cells_source))

            def run(i: int) -> None:
                cell = cells.nth(i)
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Shift+Enter")
                expect(cell.locator(".jp-InputPrompt").first).to_have_text(re.compile(r"\[\d+\]"), timeout=60_000)

            yield page, cells, run
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / failure))
            raise
        finally:
            browser.close()


def _dragger(page: Any, canvas: Any) -> Callable[[float, float, float, float], None]:
    """A mouse drag across ``canvas`` between two points given as fractions of its width and height."""
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box is not None

    def drag(x0: float, y0: float, x1: float, y1: float) -> None:
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=12)
        page.mouse.up()

    return drag


@pytest.mark.timeout(170)
def test_paint_a_mask_then_edit_only_that_region(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with _notebook(tmp_path, CELLS, "mask-failure.png") as (page, cells, run):
        run(0)
        run(1)
        expect(cells.nth(1).locator(".jp-OutputArea")).to_contain_text("512x512", timeout=60_000)
        run(2)
        painter = cells.nth(2).locator(".nbi-mask-painter")
        expect(painter).to_be_visible()
        status = painter.locator(".nbi-mp-status")
        expect(status).to_contain_text("Paint over the region")
        painter.locator(".nbi-mp-size").fill("40")
        expect(painter.locator(".nbi-mp-size-label")).to_have_text("40 px")
        drag = _dragger(page, painter.locator(".nbi-mp-paint"))

        def percent() -> float:
            text = status.inner_text()
            match = re.search(r"([\d.]+)% of the image", text)
            return float(match.group(1)) if match else 0.0

        drag(0.25, 0.5, 0.75, 0.5)  # a horizontal stroke across the middle
        expect(status).to_contain_text("% of the image will change")
        stroke = percent()
        assert 3 < stroke < 20, stroke
        painter.locator(".nbi-mp-invert").click()
        expect(status).not_to_contain_text(f"{stroke}%")
        assert percent() > 80
        painter.locator(".nbi-mp-undo").click()
        expect(status).to_contain_text(f"{stroke}%")
        painter.locator(".nbi-mp-eraser").click()
        drag(0.6, 0.5, 0.8, 0.5)  # erase the right end of the stroke
        expect(status).not_to_contain_text(f"{stroke}%")
        erased = percent()
        assert 0 < erased < stroke
        painter.locator(".nbi-mp-clear").click()
        expect(status).to_contain_text("Nothing painted")
        painter.locator(".nbi-mp-undo").click()
        expect(status).to_contain_text(f"{erased}%")
        painter.screenshot(path=str(ARTIFACTS / "mask-painter.png"))

        run(3)
        expect(cells.nth(3).locator(".jp-OutputArea")).to_contain_text("#3", timeout=60_000)
        run(4)
        out = cells.nth(4).locator(".jp-OutputArea")
        expect(out).to_contain_text("MASKCHECK")
        text = out.inner_text()
        # Nothing changed outside the painted region; something changed inside; image + mask in the lineage.
        assert "MASKCHECK None True (" in text and "[1, 2] [1, 2, 3] mask" in text, text
        page.screenshot(path=str(ARTIFACTS / "mask-edit.png"))


STUDIO_CELLS = [
    "%load_ext nbimagine",
    "%%imagine --size 1024x1536\na lighthouse on a cliff",  # not square: the mask keeps the image's shape
    "import nbimagine\nst = nbimagine.studio(settings=False)\nst",
    "from PIL import ImageChops\n"
    "h = nbimagine.history()\n"
    "edit = h.get(st.selected[0])\n"
    "mask = h.get(edit.params['mask'])\n"
    "source = h.get(1).image.to_pil().convert('RGB')\n"
    "result = edit.image.to_pil().convert('RGB')\n"
    "region = mask.image.to_pil().getchannel('A').point(lambda v: 255 if v == 0 else 0)\n"
    "changed = ImageChops.difference(source, result).convert('L').point(lambda v: 255 if v else 0)\n"
    "outside = ImageChops.subtract(changed, region).getbbox()\n"
    "print('STUDIOMASK', outside, changed.getbbox() is not None, mask.image.to_pil().size,\n"
    "      [e.id for e in h.lineage(edit.id)], st.painter is None)",
]


@pytest.mark.timeout(170)
def test_the_studio_paints_a_mask_and_edits_only_that_region(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with _notebook(tmp_path, STUDIO_CELLS, "studio-mask-failure.png") as (page, cells, run):
        run(0)
        run(1)
        expect(cells.nth(1).locator(".jp-OutputArea")).to_contain_text("1024x1536", timeout=60_000)
        run(2)
        studio = cells.nth(2).locator(".nbi-studio-root")
        expect(studio).to_be_visible()
        paint_mask, edit = studio.locator(".nbi-paint-mask"), studio.locator(".nbi-edit")
        expect(paint_mask).to_be_disabled()  # nothing selected yet
        studio.locator('.nbi-tile[data-id="1"]').click()
        expect(studio.locator(".nbi-selection-label")).to_have_text("selected: #1")
        paint_mask.click()
        area = studio.locator(".nbi-mask-area")
        painter = area.locator(".nbi-mask-painter")
        expect(painter).to_be_visible()
        expect(area.locator(".nbi-mask-title")).to_contain_text("Mask for #1")
        expect(edit).to_have_text("Edit #1 in the mask")
        status = painter.locator(".nbi-mp-status")
        expect(status).to_contain_text("Paint over the region")
        drag = _dragger(page, painter.locator(".nbi-mp-paint"))
        drag(0.3, 0.4, 0.7, 0.45)
        expect(status).to_contain_text("% of the image will change")
        studio.locator(".nbi-prompt").fill("a red door")
        studio.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "studio-mask.png"))
        edit.click()
        expect(studio.locator(".nbi-status")).to_contain_text("Done in", timeout=60_000)
        expect(studio.locator(".nbi-error")).to_be_hidden()
        expect(area).to_be_hidden()  # the painter has done its job
        expect(studio.locator(".nbi-selection-label")).to_have_text("selected: #3")  # the edit (#2 is the mask)
        expect(studio.locator(".nbi-result-caption")).to_contain_text("#3")
        expect(edit).to_have_text("Edit selected (1)")
        run(3)
        out = cells.nth(3).locator(".jp-OutputArea")
        expect(out).to_contain_text("STUDIOMASK")
        text = out.inner_text()
        # Nothing changed outside the painted region; something inside; the mask at the image's size, in the lineage.
        assert "STUDIOMASK None True (1024, 1536) [1, 2, 3] True" in text, text
