"""End to end in a real browser: JupyterLab + Debian's Chromium + Python Playwright, with the emulator.

A notebook loads the extension, opens ``%imagine panel`` and picks settings with the mouse, runs a
``%%imagine`` cell with them, opens ``%imagine studio``, generates, selects the new image in the
gallery, edits it and saves it, then checks the lineage in the kernel's history and that ``%imagine use``
updates the open panel. Screenshots go to ``build/test-artifacts/``.

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
    "%imagine studio",
    "import nbimagine\n"
    "h = nbimagine.history()\n"
    "last = h.latest(1)[0]\n"
    "print('LINEAGE', [e.id for e in h.lineage(last.id)], 'PARENTS', list(last.parents), 'COUNT', len(h))",
    "%imagine use --quality high",
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


@pytest.mark.timeout(170)
def test_panel_studio_generate_edit_lineage_in_jupyterlab(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "failure.png").unlink(missing_ok=True)
    started = time.monotonic()
    with _jupyterlab(tmp_path) as (base, token, root), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        try:
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            page.goto(f"{base}/lab/tree/e2e.ipynb?token={token}")
            # The toolbar reads idle before the kernel is connected: wait on the real state.
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
                expect(cell.locator(".jp-InputPrompt").first).to_have_text(re.compile(r"\[\d+\]"))

            def output(i: int) -> str:
                return cells.nth(i).locator(".jp-OutputArea").inner_text()

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
            # ... OpenAI only OpenAI controls.
            settings.locator(".nbi-provider select").select_option(label="OpenAI")
            expect(settings.locator(".nbi-quality select")).to_be_visible()
            expect(settings.locator(".nbi-aspect-ratio select")).to_be_hidden()
            settings.locator(".nbi-quality select").select_option("low")
            settings.locator(".nbi-size select").select_option("1536x1024")
            expect(settings.locator(".nbi-compression-on input")).to_be_disabled()
            settings.locator(".nbi-output-format select").select_option("jpeg")
            expect(settings.locator(".nbi-compression-on input")).to_be_enabled()
            settings.locator(".nbi-compression-on input").check()
            # An invalid combination is flagged inline with the reason, and not applied.
            settings.locator(".nbi-background select").select_option("transparent")
            expect(settings.locator(".nbi-error-output_format")).to_contain_text("JPEG has no transparency")
            settings.locator(".nbi-background select").select_option("opaque")
            expect(settings.locator(".nbi-error-output_format")).to_have_text("")
            page.screenshot(path=str(ARTIFACTS / "panel.png"))

            # The kernel's session has the panel's settings ...
            run(2)
            assert "SESSION openai True low 1536x1024 jpeg 80" in output(2)
            # ... and they are the defaults of the next %%imagine.
            run(3)
            expect(cells.nth(3).locator(".jp-OutputArea")).to_contain_text("1536x1024", timeout=60_000)
            assert "JPEG" in output(3)

            run(4)
            studio = cells.nth(4).locator(".nbi-studio")
            expect(studio).to_be_visible()
            expect(studio.locator(".nbi-summary")).to_contain_text("quality=low")
            expect(studio.locator(".nbi-gallery-title")).to_contain_text("(1 image)")
            studio.locator(".nbi-prompt textarea").fill("a red fox in the snow")
            generate = studio.locator(".nbi-generate")
            generate.click()
            expect(studio.locator(".nbi-result-caption")).to_contain_text("a red fox in the snow", timeout=60_000)
            caption = studio.locator(".nbi-result-caption").inner_text()
            assert "#2" in caption and "1536x1024" in caption and "openai/" in caption, caption
            expect(studio.locator(".nbi-status")).to_contain_text("Done in")
            expect(generate).to_be_enabled()
            expect(studio.locator(".nbi-gallery-title")).to_contain_text("(2 images)")
            # The newest image is first in the gallery: select it and edit it.
            first = studio.locator(".nbi-tile-select").first
            expect(first).to_have_text("#2")
            first.click()
            expect(studio.locator(".nbi-selection-label")).to_have_text("selected: #2")
            studio.locator(".nbi-prompt textarea").fill("make the fox wear a blue scarf")
            studio.locator(".nbi-edit").click()
            expect(studio.locator(".nbi-result-caption")).to_contain_text("edited from #2", timeout=60_000)
            expect(studio.locator(".nbi-result-caption")).to_contain_text("#3")
            expect(studio.locator(".nbi-gallery-title")).to_contain_text("(3 images)")
            expect(studio.locator(".nbi-error-text")).to_have_count(0)
            # Save writes the selected image at full size, relative to the notebook's folder.
            studio.locator(".nbi-save-path input").fill("exports/fox.png")
            studio.locator(".nbi-save").click()
            expect(studio.locator(".nbi-status")).to_contain_text("Saved #2 to")
            saved = root / "exports" / "fox.png"
            assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            studio.scroll_into_view_if_needed()
            studio.screenshot(path=str(ARTIFACTS / "studio.png"))

            # The edit's lineage is in the kernel's history.
            run(5)
            assert "LINEAGE [2, 3] PARENTS [2] COUNT 3" in output(5), output(5)
            # %imagine use updates the open panel.
            run(6)
            expect(settings.locator(".nbi-quality select")).to_have_value("high")
            page.screenshot(path=str(ARTIFACTS / "lab.png"))
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / "failure.png"))
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / "studio.png").stat().st_size > 10_000
    assert time.monotonic() - started < 170
