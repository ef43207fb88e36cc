"""The mask painter in a real browser: JupyterLab + Debian's Chromium + Python Playwright, with the emulator.

A notebook generates an image, opens ``%imagine mask last``, and the mouse paints a stroke (with the
size slider, the eraser, invert, undo and clear on the way); then ``%%imagine -e last --mask m`` edits
with that mask, and the kernel checks with pixels that only the painted region changed in the
emulator's answer, and that the history's lineage holds image, mask and edit. Screenshots go to
``build/test-artifacts/``. Skipped like ``test_browser.py`` when Chromium, JupyterLab or Playwright is
missing.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

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


@pytest.mark.timeout(170)
def test_paint_a_mask_then_edit_only_that_region(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "mask-failure.png").unlink(missing_ok=True)
    with _jupyterlab(tmp_path, CELLS) as (base, token, _root), sync_playwright() as p:
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
            expect(cells).to_have_count(len(CELLS))

            def run(i: int) -> None:
                cell = cells.nth(i)
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Shift+Enter")
                expect(cell.locator(".jp-InputPrompt").first).to_have_text(re.compile(r"\[\d+\]"), timeout=60_000)

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
            canvas = painter.locator(".nbi-mp-paint")
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            assert box is not None

            def drag(x0: float, y0: float, x1: float, y1: float) -> None:
                page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
                page.mouse.down()
                page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=12)
                page.mouse.up()

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
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "mask-failure.png"))
            raise
        finally:
            browser.close()
