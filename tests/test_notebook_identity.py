"""Finding the server that knows this kernel, when the runtime folder also holds broken ones.

The real path (a real Jupyter Server, renames, restarts) is ``test_jupyter_server.py``. Here the
runtime folder holds what a long-lived machine accumulates: the file of a server that died, one of a
port where something accepts connections and never answers, one of a server that answers garbage,
and one real answer (a small HTTP server speaking the sessions API's JSON). The lookup must skip
the broken ones, find the answer, send the token only in a header, and not scan again right after a
miss.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from nbimagine import _notebook

KERNEL = "0f6c1d2e-aaaa-bbbb-cccc-123456789abc"


class _Sessions(BaseHTTPRequestHandler):
    answer: ClassVar[bytes] = b"[]"
    seen: ClassVar[list[tuple[str, str]]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization", "")))
        body = type(self).answer
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(answer: bytes) -> tuple[ThreadingHTTPServer, type[_Sessions]]:
    handler = type("Handler", (_Sessions,), {"answer": answer, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "runtime"
    folder.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(folder))
    return folder


def _write(runtime: Path, name: str, url: str, pid: int, token: str = "") -> None:
    (runtime / name).write_text(json.dumps({"url": url, "pid": pid, "token": token, "base_url": "/"}))


def test_the_server_that_knows_the_kernel_is_found_among_broken_ones(runtime: Path) -> None:
    import os

    silent = socket.socket()  # accepts connections (the kernel's backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    garbage, _ = _serve(b"<html>not json</html>")
    good, handler = _serve(json.dumps([
        {"id": "s1", "path": "other.ipynb", "type": "notebook", "kernel": {"id": "someone-else"}},
        {"id": "s2", "path": "console-1", "type": "console", "kernel": {"id": KERNEL}},
        {"id": "s3", "path": "work/cafe.ipynb", "type": "notebook", "kernel": {"id": KERNEL}},
    ]).encode())
    try:
        _write(runtime, "jpserver-1.json", "http://127.0.0.1:9/", 2**22 - 3)  # its process is gone
        _write(runtime, "jpserver-2.json", f"http://127.0.0.1:{silent.getsockname()[1]}/", os.getpid())
        _write(runtime, "jpserver-3.json", f"http://127.0.0.1:{garbage.server_address[1]}/", os.getpid())
        _write(runtime, "jpserver-4.json", f"http://127.0.0.1:{good.server_address[1]}/", os.getpid(), "t0k3n")
        (runtime / "jpserver-5.json").write_text("{ torn")
        lookup = _notebook._ServerLookup()
        assert lookup.notebook_path(KERNEL) == "work/cafe.ipynb"  # the notebook session, not the console
        assert handler.seen == [("/api/sessions", "token t0k3n")]  # the token in a header, never in the URL
        # Asked again: the server that answered is asked first, without a new scan.
        lookup.asked_in = "another cell"
        assert lookup.notebook_path(KERNEL) == "work/cafe.ipynb" and len(handler.seen) == 2
    finally:
        silent.close()
        garbage.shutdown()
        good.shutdown()


def test_no_server_knows_the_kernel(runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    other, handler = _serve(json.dumps([{"path": "x.ipynb", "type": "notebook", "kernel": {"id": "nope"}}]).encode())
    try:
        _write(runtime, "jpserver-1.json", f"http://127.0.0.1:{other.server_address[1]}/", os.getpid())
        lookup = _notebook._ServerLookup()
        assert lookup.notebook_path(KERNEL) is None
        assert lookup.notebook_path(KERNEL) is None
        assert len(handler.seen) == 1  # after a miss, no new scan of every server in the next cells for a while
    finally:
        other.shutdown()


def test_sources_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    _notebook.set_notebook(None)
    try:
        assert not _notebook.current().known or _notebook.current().source == "script"
        monkeypatch.setenv("JPY_SESSION_NAME", "/srv/nb/Report 2025.ipynb")
        assert (_notebook.current().name, _notebook.current().source) == ("Report 2025", "session-env")
        _notebook.set_notebook("chosen.ipynb")
        assert (_notebook.current().name, _notebook.current().source) == ("chosen", "explicit")
        with pytest.raises(ValueError):
            _notebook.set_notebook("/")
        with pytest.raises(TypeError):
            _notebook.set_notebook(3)  # type: ignore[arg-type]
    finally:
        _notebook.set_notebook(None)
