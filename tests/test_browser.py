"""End to end in a real browser: JupyterLab + Debian's Chromium + Python Playwright, with the emulator.

A notebook loads the extension, opens ``%imagine panel`` and picks settings with the mouse (a choice the
session refuses is put back with the reason), runs a ``%%imagine`` cell with them, then opens
``%imagine studio`` and uses the gallery as a user would: partial images in place of the result being
made, select by click and by keyboard, details with lineage, side-by-side compare, edit (the selection
moves to the edit), save next to its feedback with readable names and no silent overwrite, cancel; the
layout is checked at 1024 px. Finally the notebook is saved and reopened with a new kernel: the widgets
are gone and their static copies show, with no "model not found" error and no raw widget repr.
Screenshots go to ``build/test-artifacts/``.

Skipped (with the reason) when ``/usr/bin/chromium``, jupyterlab or playwright is missing; ``.ci/run``
installs Chromium so CI always runs it. The JupyterLab server runs on 127.0.0.1 with a random port
and token, in a temporary folder, and is always stopped (its whole process group) at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
KERNEL = "nbimagine-e2e"


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    for module, extra in (("jupyterlab", "jupyterlab"), ("playwright", "playwright"),
                          ("jupyterlab_widgets", "jupyterlab_widgets")):
        if importlib.util.find_spec(module) is None:
            return f"{extra} is not installed (pip install -e '.[browser]')"
    return None


pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(_missing() is not None, reason=f"real-browser test skipped: {_missing()}"),
]

CELLS = [
    "%load_ext nbimagine",
    "%imagine panel",
    "from nbimagine._session import get_session\n"
    "s = get_session()\n"
    "print('SESSION', s.provider, s.emulator, s.quality, s.size, s.output_format, s.output_compression)",
    "%%imagine\na lighthouse at dusk",
    # Paced answers, so that partial images are on screen long enough to be seen.
    "from nbimagine._session import emulator\n"
    "emulator().stream_delay = 0.4\n"
    "%imagine use --partial 2",
    "%imagine studio",
    "import nbimagine\n"
    "h = nbimagine.history()\n"
    "last = h.latest(1)[0]\n"
    "print('LINEAGE', [e.id for e in h.lineage(last.id)], 'PARENTS', list(last.parents), 'COUNT', len(h))",
    "%imagine use --quality high",
    "emulator().latency = 30",  # the next request hangs until it is cancelled
    # Run in the reopened notebook: one image per page, so that pages can be turned from the keyboard.
    "import nbimagine\nnbimagine.studio(per_page=1, settings=False)",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@contextlib.contextmanager
def _jupyterlab(tmp: Path, cells: list[str] = CELLS) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server whose kernel is this interpreter with NBIMAGINE_EMULATOR=1; ``e2e.ipynb`` holds ``cells``."""
    jupyter_path = tmp / "jupyter"
    _write_json(jupyter_path / "kernels" / KERNEL / "kernel.json", {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbimagine e2e", "language": "python",
        "env": {"NBIMAGINE_EMULATOR": "1"},
    })
    settings = tmp / "lab-settings"
    _write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    # Every cell stays in the DOM, so locators by cell position are stable.
    _write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none"})
    root = tmp / "root"
    root.mkdir()
    notebook = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": {"name": KERNEL, "display_name": "nbimagine e2e", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    _write_json(root / "e2e.ipynb", notebook)
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.update(JUPYTER_PATH=str(jupyter_path), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_DATA_DIR=str(tmp / "data"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               NBIMAGINE_EMULATOR="1")
    log = (tmp / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True"],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({proc.returncode}):\n"
                                   + (tmp / "jupyterlab.log").read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base, token, root
    finally:
        # The server and its kernels share one process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _one_line(locator) -> bool:
    """The element's content is laid out on one line (it did not wrap)."""
    return locator.evaluate("""node => {
        const kids = [...node.children].map(k => k.getBoundingClientRect()).filter(r => r.height > 0);
        const tallest = Math.max(...kids.map(r => r.height));
        return node.getBoundingClientRect().height < 1.6 * tallest; }""")


@pytest.mark.timeout(300)
def test_panel_studio_gallery_and_saved_notebook_in_jupyterlab(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "failure.png").unlink(missing_ok=True)
    with _jupyterlab(tmp_path) as (base, token, root), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1024, "height": 1400})
        try:
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)

            def open_notebook() -> None:
                page.goto(f"{base}/lab/tree/e2e.ipynb?token={token}")
                # The toolbar reads idle before the kernel is connected: wait on the real state.
                page.wait_for_function("""() => {
                    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                    return k && k.connectionStatus === 'connected' && k.status === 'idle'; }""", timeout=60_000)

            open_notebook()
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(cells).to_have_count(len(CELLS))

            def run(i: int) -> None:
                cell = cells.nth(i)
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Shift+Enter")
                expect(cell.locator(".jp-InputPrompt").first).to_have_text(re.compile(r"\[\d+\]"))

            def output(i: int) -> str:
                return cells.nth(i).locator(".jp-OutputArea").inner_text()

            # --- the settings panel ------------------------------------------------------------------
            run(0)
            run(1)
            settings = cells.nth(1).locator(".nbi-panel")
            expect(settings).to_be_visible()
            # The kernel's NBIMAGINE_EMULATOR=1 turned the emulator on, and the panel shows it.
            expect(settings.locator(".nbi-emulator input")).to_be_checked()
            expect(settings.locator(".nbi-key-hint")).to_contain_text("no key is needed")
            # Gemini shows only Gemini controls ...
            settings.locator(".nbi-provider select").select_option(label="Gemini")
            expect(settings.locator(".nbi-aspect-ratio select")).to_be_visible()
            expect(settings.locator(".nbi-quality select")).to_be_hidden()
            # As a user reads the panel before the next choice: the kernel has applied the provider (a choice
            # made while the switch is still on its way may be overwritten by the panel's refresh).
            expect(settings.locator(".nbi-in-effect")).to_contain_text("In effect: Gemini")
            settings.locator(".nbi-aspect-ratio select").select_option("16:9")
            expect(settings.locator(".nbi-in-effect")).to_contain_text("aspect_ratio=16:9")
            # ... OpenAI only OpenAI controls, and the Gemini value is shown as kept, not in effect.
            settings.locator(".nbi-provider select").select_option(label="OpenAI")
            expect(settings.locator(".nbi-quality select")).to_be_visible()
            expect(settings.locator(".nbi-aspect-ratio select")).to_be_hidden()
            expect(settings.locator(".nbi-inactive")).to_contain_text("Kept for Gemini, not used with OpenAI")
            settings.locator(".nbi-quality select").select_option("low")
            settings.locator(".nbi-size select").select_option("1536x1024")
            expect(settings.locator(".nbi-compression-on input")).to_be_disabled()
            settings.locator(".nbi-output-format select").select_option("jpeg")
            expect(settings.locator(".nbi-compression-on input")).to_be_enabled()
            settings.locator(".nbi-compression-on input").check()
            # A combination the session refuses is put back, with the reason beside it.
            settings.locator(".nbi-background select").select_option("transparent")
            expect(settings.locator(".nbi-error-output_format")).to_contain_text("JPEG has no transparency")
            expect(settings.locator(".nbi-background select")).to_have_value("default")
            settings.locator(".nbi-background select").select_option("opaque")
            expect(settings.locator(".nbi-error-output_format")).to_have_text("")
            # A custom size that is not valid yet says so while it is typed, naming the size in effect.
            settings.locator(".nbi-size select").select_option(label="custom WxH")
            settings.locator(".nbi-custom-size input").fill("1000x1000")
            expect(settings.locator(".nbi-error-size")).to_contain_text("not applied yet")
            expect(settings.locator(".nbi-error-size")).to_contain_text("the size in effect is 1536x1024")
            settings.locator(".nbi-custom-size input").fill("1008x1008")
            expect(settings.locator(".nbi-error-size")).to_have_text("")
            settings.locator(".nbi-size select").select_option("1536x1024")
            expect(settings.locator(".nbi-in-effect")).to_contain_text("size=1536x1024")
            # At 1024 px nothing wraps: the key status stays on one line, the button keeps its label.
            keys = settings.locator(".nbi-key")
            for i in range(keys.count()):
                assert keys.nth(i).evaluate("n => n.getClientRects().length") == 1, keys.nth(i).inner_text()
            button = settings.locator(".nbi-refresh-keys")
            assert button.evaluate("n => n.scrollWidth <= n.clientWidth + 1"), "Check keys is cut"
            area = cells.nth(1).locator(".jp-OutputArea").bounding_box()
            for shown in (button, keys.last):  # nothing pushed out of the output area either
                box = shown.bounding_box()
                assert area and box and box["x"] + box["width"] <= area["x"] + area["width"] + 1, shown
            for label in settings.locator(".widget-label").all():
                assert label.evaluate("n => n.scrollWidth <= n.clientWidth + 1"), label.inner_text()
            page.screenshot(path=str(ARTIFACTS / "panel.png"))
            # Foundry at 1024 px: its own fields, labels whole, nothing pushed out; then back to OpenAI.
            settings.locator(".nbi-provider select").select_option(label="Microsoft Foundry agent")
            endpoint = settings.locator(".nbi-project-endpoint input")
            expect(endpoint).to_be_visible()
            expect(settings.locator(".nbi-agent-name input")).to_be_visible()
            expect(settings.locator(".nbi-aspect-ratio select")).to_be_hidden()
            for label in settings.locator(".widget-label").all():
                if label.is_visible():
                    assert label.evaluate("n => n.scrollWidth <= n.clientWidth + 1"), label.inner_text()
            area = cells.nth(1).locator(".jp-OutputArea").bounding_box()
            box = endpoint.bounding_box()
            assert area and box and box["x"] + box["width"] <= area["x"] + area["width"] + 1, "endpoint field"
            page.screenshot(path=str(ARTIFACTS / "panel-foundry.png"))
            settings.locator(".nbi-provider select").select_option(label="OpenAI")
            expect(settings.locator(".nbi-quality select")).to_have_value("low")

            # The kernel's session has the panel's settings ...
            run(2)
            assert "SESSION openai True low 1536x1024 jpeg 80" in output(2)
            # ... and they are the defaults of the next %%imagine.
            run(3)
            expect(cells.nth(3).locator(".jp-OutputArea")).to_contain_text("1536x1024", timeout=60_000)
            assert "JPEG" in output(3)
            run(4)

            # --- the studio ----------------------------------------------------------------------------
            run(5)
            studio = cells.nth(5).locator(".nbi-studio-root")
            expect(studio).to_be_visible()
            expect(studio.locator(".nbi-summary")).to_contain_text("quality=low")
            expect(studio.locator(".nbi-gallery-title")).to_contain_text("(1 image)")
            # Live, the static copy that follows the widget is hidden.
            expect(cells.nth(5).locator("[data-nbi-snapshot]")).to_be_hidden()
            cancel = studio.locator(".nbi-cancel")
            expect(cancel).to_be_disabled()
            assert float(cancel.evaluate("n => getComputedStyle(n).opacity")) < 0.6, "a disabled Cancel looks active"
            for row in (".nbi-actions", ".nbi-toolbar", ".nbi-save-row"):
                assert _one_line(studio.locator(row)), f"{row} wraps at 1024 px"

            studio.locator(".nbi-prompt").fill("a red fox in the snow")
            generate = studio.locator(".nbi-generate")
            generate.click()
            # Partial images take the result's place: no previous result beside them.
            expect(studio.locator(".nbi-partial")).to_be_visible(timeout=60_000)
            expect(studio.locator(".nbi-result")).to_have_count(0)
            expect(cancel).to_be_enabled()
            expect(studio.locator(".nbi-status")).to_contain_text("Generating")
            studio.screenshot(path=str(ARTIFACTS / "studio-partial.png"))
            expect(studio.locator(".nbi-result-caption")).to_contain_text("#2", timeout=60_000)
            caption = studio.locator(".nbi-result-caption").inner_text()
            assert "1536x1024" in caption and "openai/" in caption and "a red fox in the snow" in caption, caption
            expect(studio.locator(".nbi-status")).to_contain_text("Done in")
            expect(generate).to_be_enabled()
            expect(studio.locator(".nbi-gallery-title")).to_contain_text("(2 images)")
            # A caption too long for its tile ends in an ellipsis, not cut mid-letter.
            prompt = studio.locator(".nbi-tile-prompt").first
            assert prompt.evaluate("n => getComputedStyle(n).textOverflow") == "ellipsis"
            assert prompt.evaluate("n => getComputedStyle(n).whiteSpace") == "nowrap"
            # The new image is selected.
            tile2, tile1 = studio.locator('.nbi-tile[data-id="2"]'), studio.locator('.nbi-tile[data-id="1"]')
            expect(tile2).to_have_attribute("aria-selected", "true")
            expect(studio.locator(".nbi-selection-label")).to_have_text("selected: #2")
            # Click selects and deselects (the whole tile, not only its label).
            tile2.locator("img").click()
            expect(studio.locator(".nbi-selection-label")).to_have_text("nothing selected")
            tile2.locator("img").click()
            expect(tile2).to_have_attribute("aria-selected", "true")
            # Keyboard: arrows move, Space selects, Enter opens.
            tile2.focus()
            page.keyboard.press("ArrowRight")
            expect(tile1).to_be_focused()
            page.keyboard.press("Space")
            expect(studio.locator(".nbi-selection-label")).to_have_text("selected: #2, #1")
            # Compare the two selected images side by side.
            studio.locator(".nbi-compare").click()
            compare = studio.locator(".nbi-compare-view")
            expect(compare).to_be_visible()
            expect(compare.locator("img")).to_have_count(2)
            page.keyboard.press("Escape")
            expect(compare).to_be_hidden()
            tile1.focus()
            page.keyboard.press("Enter")
            detail = studio.locator(".nbi-detail")
            expect(detail).to_be_visible()
            expect(detail.locator(".nbi-meta")).to_contain_text("sha256")
            expect(detail.locator(".nbi-meta")).to_contain_text("1536x1024")
            detail.locator(".nbi-close").click()
            expect(detail).to_be_hidden()

            # Edit the fox: the selection moves to the edit.
            studio.locator(".nbi-clear-selection").click()
            tile2.locator("img").click()
            studio.locator(".nbi-prompt").fill("make the fox wear a blue scarf")
            studio.locator(".nbi-edit").click()
            expect(studio.locator(".nbi-result-caption")).to_contain_text("edited from #2", timeout=60_000)
            expect(studio.locator(".nbi-result-caption")).to_contain_text("#3")
            expect(studio.locator(".nbi-selection-label")).to_have_text("selected: #3")
            expect(studio.locator(".nbi-error")).to_be_hidden()
            # The details of the edit show its lineage, and compare it with its source.
            studio.locator('.nbi-tile[data-id="3"]').dblclick()
            expect(detail.locator(".nbi-lineage-step")).to_have_count(2)
            detail.locator(".nbi-compare-source").click()
            expect(compare).to_contain_text("#2 and #3")
            studio.screenshot(path=str(ARTIFACTS / "studio-compare.png"))
            compare.locator(".nbi-close").click()

            # Save: readable names, the feedback beside the button, never a silent overwrite.
            studio.locator(".nbi-save-path").fill("exports/")
            studio.locator(".nbi-save").click()
            feedback = studio.locator(".nbi-save-feedback")
            expect(feedback).to_contain_text("Saved #3 to")
            saved = root / "exports" / "3-make-the-fox-wear-a-blue-scarf.jpg"  # the panel chose jpeg
            assert saved.read_bytes()[:3] == b"\xff\xd8\xff"
            row, near = studio.locator(".nbi-save-row").bounding_box(), feedback.bounding_box()
            assert row and near and row["y"] <= near["y"] <= row["y"] + row["height"], "feedback far from Save"
            studio.locator(".nbi-save").click()
            expect(feedback).to_contain_text("the same image was already there")
            studio.locator(".nbi-save-path").fill("exports/fox.png")
            studio.locator(".nbi-save").click()
            expect(feedback).to_contain_text("Saved #3 to")
            expect(feedback).to_contain_text("converted to PNG")
            assert (root / "exports" / "fox.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            studio.locator(".nbi-save").click()
            expect(feedback).to_contain_text("already exists")
            expect(feedback).not_to_contain_text("Errno")
            studio.scroll_into_view_if_needed()
            studio.screenshot(path=str(ARTIFACTS / "studio.png"))

            # The edit's lineage is in the kernel's history.
            run(6)
            assert "LINEAGE [2, 3] PARENTS [2] COUNT 3" in output(6), output(6)
            # %imagine use updates the open panel.
            run(7)
            expect(settings.locator(".nbi-quality select")).to_have_value("high")

            # Cancel: the request stops, and no old image stays under "Cancelled".
            run(8)
            studio.locator(".nbi-prompt").fill("a slow painting")
            generate.click()
            expect(studio.locator(".nbi-placeholder")).to_be_visible()
            cancel.click()
            expect(studio.locator(".nbi-status")).to_contain_text("Cancelled after", timeout=20_000)
            expect(studio.locator(".nbi-result")).to_have_count(0)
            expect(generate).to_be_enabled()
            page.screenshot(path=str(ARTIFACTS / "lab.png"))

            # --- saved and reopened with a new kernel --------------------------------------------------
            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")
            page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
            open_notebook()
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(cells.nth(len(CELLS) - 1)).to_be_attached()  # (Shift+Enter on the last cell added one)
            copy = cells.nth(5).locator("[data-nbi-snapshot]")
            expect(copy).to_be_visible()
            expect(copy.locator("img")).to_have_count(3)
            expect(copy).to_contain_text("make the fox wear a blue scarf")
            expect(cells.nth(1).locator("[data-nbi-snapshot]")).to_contain_text("size=1536x1024")
            # The widget manager gives up on the models of the old kernel (panel and studio) ...
            notebook = page.locator(".jp-Notebook")
            dead = notebook.locator(".jp-OutputArea-output.jupyter-widgets")
            expect(dead).to_have_count(2)
            # ... and the error lines it writes there are hidden by the static copies that follow them.
            expect(dead.locator("visible=true")).to_have_count(0)
            expect(notebook.get_by_text("model not found").locator("visible=true")).to_have_count(0)
            assert "VBox(children" not in notebook.inner_text()
            page.screenshot(path=str(ARTIFACTS / "reopened.png"), full_page=True)

            # Keyboard only through a long history: PageDown / PageUp and the arrows past the edge turn the
            # page, and the focus follows onto the new page's tiles (3 images, one per page here).
            paged = len(CELLS) - 1
            run(paged)
            pager = cells.nth(paged).locator(".nbi-studio")
            expect(pager.locator(".nbi-page-label")).to_have_text("page 1 of 3", timeout=60_000)
            pager.locator('.nbi-tile[data-id="3"]').focus()
            page.keyboard.press("PageDown")
            expect(pager.locator(".nbi-page-label")).to_have_text("page 2 of 3")
            expect(pager.locator('.nbi-tile[data-id="2"]')).to_be_focused()
            page.keyboard.press("ArrowRight")
            expect(pager.locator('.nbi-tile[data-id="1"]')).to_be_focused()
            page.keyboard.press("Space")
            expect(pager.locator(".nbi-selection-label")).to_have_text("selected: #1")
            page.keyboard.press("PageUp")
            expect(pager.locator(".nbi-page-label")).to_have_text("page 2 of 3")
            expect(pager.locator('.nbi-tile[data-id="2"]')).to_be_focused()
            page.keyboard.press("ArrowLeft")
            expect(pager.locator('.nbi-tile[data-id="3"]')).to_be_focused()
            page.keyboard.press("PageUp")  # the first page: nothing to turn, the focus stays
            expect(pager.locator('.nbi-tile[data-id="3"]')).to_be_focused()
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "failure.png"))
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / "studio.png").stat().st_size > 10_000
