"""The history follows its notebook, through a real Jupyter Server.

A real ``jupyter server`` on a free loopback port; notebooks and sessions made through its REST API
as JupyterLab makes them (File > New, File > Rename: the contents API renames the file, the
sessions API moves the session); code run in the kernel over the kernel's websocket channels, as a
frontend runs a cell. The kernel learns its notebook from the server's sessions API, so the history
follows renames and kernel restarts, and a second notebook sees none of the first one's images.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

websocket = pytest.importorskip("websocket")  # websocket-client, installed with jupyter_server
pytest.importorskip("jupyter_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A Jupyter Server in a subprocess, and a tiny client for its REST API and kernel channels."""

    def __init__(self, root: Path, runtime: Path) -> None:
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "NBIMAGINE_EMULATOR": "1",
               "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(runtime / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (runtime / "server.log").read_text()
                    raise RuntimeError(f"the Jupyter server did not start: {log}") from None
                time.sleep(0.1)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            data = response.read()
        return json.loads(data) if data else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    # -- notebooks as JupyterLab handles them ----------------------------------------------------

    def new_notebook(self) -> dict[str, Any]:
        """File > New > Notebook: an Untitled*.ipynb and a session with a new kernel."""
        model = self.api("POST", "/api/contents", {"type": "notebook"})
        return self.api("POST", "/api/sessions", {"path": model["path"], "name": model["name"], "type": "notebook",
                                                  "kernel": {"name": "python3"}})

    def rename(self, session: dict[str, Any], new: str) -> dict[str, Any]:
        """File > Rename: the file through the contents API, then the session through the sessions API."""
        self.api("PATCH", f"/api/contents/{session['path']}", {"path": new})
        return self.api("PATCH", f"/api/sessions/{session['id']}", {"path": new, "name": new})

    def restart(self, session: dict[str, Any]) -> None:
        self.api("POST", f"/api/kernels/{session['kernel']['id']}/restart")


class Kernel:
    """The kernel's channels over the server's websocket, run like a frontend runs cells."""

    def __init__(self, server: Server, kernel_id: str) -> None:
        url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?token={server.token}"
        self.ws = websocket.create_connection(url, timeout=120, http_proxy_host=None)
        self.session = uuid.uuid4().hex

    def close(self) -> None:
        self.ws.close()

    def run(self, code: str) -> dict[str, Any]:
        """Execute ``code``; returns its stdout, stderr, displayed outputs and error (if any)."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": self.session, "msg_type": "execute_request",
                       "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        result: dict[str, Any] = {"stdout": "", "stderr": "", "outputs": [], "error": None}
        replied = idle = False
        while not (replied and idle):
            msg = json.loads(self.ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "execute_reply":
                replied = True
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind == "stream":
                result[content["name"]] += content["text"]
            elif kind in ("display_data", "update_display_data", "execute_result"):
                result["outputs"].append({"data": content["data"], "metadata": content.get("metadata", {})})
            elif kind == "error":
                result["error"] = f"{content['ename']}: {content['evalue']}"
        return result


def _images(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The history images the cell's outputs name in their metadata (one output per image)."""
    return [o["metadata"]["nbimagine"] for o in result["outputs"] if "sha256" in o["metadata"].get("nbimagine", {})]


def _wait_ready(server: Server, session: dict[str, Any]) -> Kernel:
    deadline = time.monotonic() + 60
    while True:  # right after a start or restart the kernel may not answer yet
        try:
            kernel = Kernel(server, session["kernel"]["id"])
            if kernel.run("1 + 1")["error"] is None:
                return kernel
        except (OSError, websocket.WebSocketException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "work"
    root.mkdir()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    srv = Server(root, runtime)
    srv.root = root  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_the_history_follows_its_notebook_through_renames_and_restarts(server: Server) -> None:
    # A new notebook renamed to cafe.ipynb before its first image (the first case).
    session = server.rename(server.new_notebook(), "cafe.ipynb")
    kernel = _wait_ready(server, session)
    assert kernel.run("%load_ext nbimagine")["error"] is None
    first = kernel.run("%%imagine -o r\nA cat asleep on a cafe chair")
    assert first["error"] is None, first
    [shown] = _images(first)
    assert shown["history_id"] == 1 and len(shown["sha256"]) == 64  # the saved notebook links to the file
    assert (server.root / shown["file"]).is_file()  # type: ignore[attr-defined]
    assert "cannot tell which notebook" not in first["stdout"]
    check = kernel.run("import nbimagine; h = nbimagine.history(); print(h.notebook, h.identity.source, len(h))")
    assert check["stdout"].split() == ["cafe", "server", "1"]
    kernel.run("%%imagine\nA second cat")

    # Renamed again with images: they go with it, and the next cell says so.
    session = server.rename(session, "bistro.ipynb")
    third = kernel.run("%%imagine -e #1\nThe cat wearing a beret")
    assert third["error"] is None, third
    assert "images of 'cafe' now belong to 'bistro'" in third["stderr"]
    assert [i["history_id"] for i in _images(third)] == [3]
    kernel.close()

    # Restart: the kernel id stays, the history is the notebook's, #1 still means the first cat.
    server.restart(session)
    kernel = _wait_ready(server, session)
    kernel.run("%load_ext nbimagine")
    listed = kernel.run("%imagine history")
    text = listed["outputs"][-1]["data"]["text/plain"]
    assert text.startswith("History of 'bistro': 3 of 3 image(s)"), text
    edited = kernel.run("%%imagine -e #1 -o r\nThe cat in the rain\n")
    assert edited["error"] is None, edited
    parents = kernel.run("import nbimagine; print(list(nbimagine.history()[-1].parents), "
                         "r.files[0].metadata['history_id'])")
    assert parents["stdout"].split() == ["[1]", "4"]
    kernel.close()

    # Renamed, then restarted before any new image: the rename is still followed (kernel id kept).
    session = server.rename(session, "final.ipynb")
    server.restart(session)
    kernel = _wait_ready(server, session)
    kernel.run("%load_ext nbimagine")
    text = kernel.run("%imagine history")["outputs"][-1]["data"]["text/plain"]
    assert text.startswith("History of 'final': 4 of 4 image(s)"), text
    kernel.close()

    # A second notebook sees none of it, unless asked with --all.
    other = server.new_notebook()
    assert other["path"] == "Untitled.ipynb"
    kernel = _wait_ready(server, other)
    kernel.run("%load_ext nbimagine")
    empty = kernel.run("%imagine history")["outputs"][-1]["data"]
    assert empty["text/plain"].startswith("History of 'Untitled': 0 of 0 image(s)")
    assert "<img" not in empty["text/html"] and "'final' (4)" in empty["text/plain"]
    missing = kernel.run("%%imagine -e last\nedit the last image")
    # IPython shows a UsageError as one line on stderr, not as a traceback.
    assert "UsageError" in missing["stderr"] and "has only 0 image(s)" in missing["stderr"]
    everything = kernel.run("%imagine history --all")["outputs"][-1]["data"]["text/plain"]
    assert "4 of 4 image(s)" in everything and "[final]" in everything
    kernel.close()


@pytest.mark.timeout(300)
def test_a_notebook_moved_to_another_folder_is_told_where_its_history_is(server: Server) -> None:
    # A notebook moved while its kernel runs: the kernel stays in the old folder, and so does the history
    # (a kernel started in the new folder would find an empty one). The cell says so, once, with the fix.
    root: Path = server.root  # type: ignore[attr-defined]
    for folder in ("a", "b"):
        (root / folder).mkdir()
    made = server.api("POST", "/api/contents/a", {"type": "notebook"})
    server.api("PATCH", f"/api/contents/{made['path']}", {"path": "a/x.ipynb"})
    session = server.api("POST", "/api/sessions", {"path": "a/x.ipynb", "name": "x.ipynb", "type": "notebook",
                                                   "kernel": {"name": "python3"}})
    kernel = _wait_ready(server, session)
    kernel.run("%load_ext nbimagine")
    first = kernel.run("%%imagine\nA lighthouse")
    assert first["error"] is None and "is now in" not in first["stdout"]
    session = server.rename(session, "b/moved.ipynb")  # File > Move (JupyterLab renames file and session)
    moved = kernel.run("%%imagine -e #1\nThe lighthouse at night")
    assert moved["error"] is None, moved
    assert f"is now in {root / 'b'}, but its images are kept in {root / 'a' / '.nbimagine'}" in moved["stdout"]
    assert f"%imagine history --root {root / 'a'}" in moved["stdout"]
    assert "is now in" not in kernel.run("%%imagine\nA third one")["stdout"]  # said once
    kernel.close()

    # Reopened from its new folder (a new session, its kernel in b/): the advice finds the history again.
    server.api("DELETE", f"/api/sessions/{session['id']}")
    session = server.api("POST", "/api/sessions", {"path": "b/moved.ipynb", "name": "moved.ipynb",
                                                   "type": "notebook", "kernel": {"name": "python3"}})
    kernel = _wait_ready(server, session)
    kernel.run("%load_ext nbimagine")
    kernel.run(f"%imagine history --root {root / 'a'}")
    listed = kernel.run("%imagine history")["outputs"][-1]["data"]["text/plain"]
    assert listed.startswith("History of 'moved': 3 of 3 image(s)"), listed
    assert kernel.run("%%imagine -e #2\nAt dawn")["error"] is None
    kernel.close()
