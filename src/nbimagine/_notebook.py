"""Which notebook is this kernel running? The name that picks the notebook's history.

Looked up in this order (:func:`current`):

1. ``explicit``: a name given with :func:`set_notebook` (``%imagine history --notebook NAME``);
2. ``server``: the Jupyter server that started this kernel, asked through its sessions API
   (``GET /api/sessions``, the session whose kernel id is ours). This is the only source that
   follows a rename: the kernel id stays the same when a notebook is renamed, and after a kernel
   restart. Asked once per cell (and at most once a second), so every generation sees a rename;
3. ``session-env``: ``JPY_SESSION_NAME``, which Jupyter Server sets when it starts the kernel (it
   is not updated by a rename, hence after the sessions API);
4. ``vscode``: VS Code's ``__vsc_ipynb_file__`` in the user namespace;
5. ``script``: in plain Python (no IPython shell), the stem of the ``__main__`` script;
6. ``unknown``: ``untitled-<8 hex>``, a history of this kernel alone (the tag is the start of the
   kernel id, which survives a kernel restart, else random per process). An unknown notebook
   never shares a history with another one; the notebook layer says so in the cell.

Why not ``ipynbname``: it does the same lookup, but sends the server token as a URL query through
``urllib``, which honours ``HTTP(S)_PROXY``, so behind a proxy the token goes to the proxy; it scans
every server on every call with no way to reuse the one that answered; and it raises outside
IPython. The lookup here talks to the server directly (``http.client``, no proxy), sends the token in
the ``Authorization`` header, remembers the server that knew this kernel, and gives every request a
short timeout (0.5 s, at most 1.5 s for a full scan, and after a scan that found nothing, no new scan
for 10 s), so a cell is never held up for long.

Nothing heavy is imported: IPython and ipykernel are only read from ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NotebookIdentity", "current", "normalize_name", "notebook_name", "set_notebook"]

_REQUEST_TIMEOUT = 0.5
_SCAN_BUDGET = 1.5
_FRESH_FOR = 1.0  # seconds an answer from the server is reused within one cell
_RESCAN_AFTER_MISS = 10.0


@dataclass(frozen=True)
class NotebookIdentity:
    """The notebook this kernel runs: its ``name`` (the key of its history) and how it was found.

    ``source`` is one of ``explicit``, ``server``, ``session-env``, ``vscode``, ``script``, ``unknown``;
    ``path`` is the path the source gave (relative to the server's root for ``server``);
    ``kernel_id`` is the Jupyter kernel id when the kernel has one; ``directory`` the folder the notebook
    is in now, when the server says where its root is (it differs from the kernel's working directory
    once the notebook was moved to another folder while its kernel ran).
    """

    name: str
    source: str
    path: str | None = None
    kernel_id: str | None = None
    directory: Path | None = None

    @property
    def known(self) -> bool:
        return self.source != "unknown"


def normalize_name(name: str) -> str:
    """A notebook name as a history key: NFC, trimmed, without ``.ipynb``, no control characters."""
    name = unicodedata.normalize("NFC", name).strip()
    if name.lower().endswith(".ipynb"):
        name = name[: -len(".ipynb")].rstrip()
    return "".join("_" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in name)


def _stem(path: str, any_suffix: bool = True) -> str:
    """The notebook name in a path: last component without ``.ipynb`` (or, for a path Jupyter gave,
    without any suffix: a Jupytext ``analysis.py`` is the notebook ``analysis``)."""
    name = re.split(r"[\\/]", path.rstrip("\\/"))[-1]
    if name.lower().endswith(".ipynb"):
        return normalize_name(name[: -len(".ipynb")])
    return normalize_name((Path(name).stem or name) if any_suffix else name)


# --------------------------------------------------------------------------------------------
# explicit
# --------------------------------------------------------------------------------------------

_explicit: str | None = None


def set_notebook(name: str | None) -> None:
    """Name the current notebook explicitly (``None`` forgets the name and detects again).

    ``name`` may also be the notebook's path; its last component without ``.ipynb`` is used. An
    explicit name wins over anything detected, for this kernel process.
    """
    global _explicit
    if name is not None and not isinstance(name, str):
        raise TypeError(f"set_notebook() takes a str or None, not {type(name).__name__}")
    stem = _stem(name, any_suffix=False) if name else ""
    if name and not stem:
        raise ValueError(f"{name!r} does not name a notebook")
    _explicit = stem or None


# --------------------------------------------------------------------------------------------
# the Jupyter server's sessions API
# --------------------------------------------------------------------------------------------


def _kernel_id() -> str | None:
    """This kernel's id, from its connection file ``kernel-<id>.json`` (as Jupyter Server names it)."""
    if "ipykernel" not in sys.modules:
        return None
    try:
        from ipykernel.connect import get_connection_file

        stem = Path(get_connection_file()).stem
    except Exception:  # not in a running kernel (an IPython terminal, a test shell)
        return None
    found = re.fullmatch(r"kernel-([0-9A-Za-z][0-9A-Za-z-]{7,})", stem)
    return found.group(1) if found else None


def _runtime_dir() -> Path | None:
    try:
        from jupyter_core.paths import jupyter_runtime_dir  # installed with every ipykernel
    except ImportError:
        return None
    try:
        return Path(jupyter_runtime_dir())
    except Exception:  # a broken Jupyter configuration must not break generation
        return None


def _servers() -> list[dict[str, Any]]:
    """The servers that wrote a runtime file here, newest first, skipping those whose process is gone."""
    folder = _runtime_dir()
    if folder is None or not folder.is_dir():
        return []
    files = []
    for pattern in ("jpserver-*.json", "nbserver-*.json"):
        for path in folder.glob(pattern):
            with contextlib.suppress(OSError):
                files.append((path.stat().st_mtime, path))
    found = []
    for _, path in sorted(files, reverse=True):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or not str(info.get("url", "")).startswith(("http://", "https://")):
            continue  # unix-socket servers are not supported: fall back to the next source
        pid = info.get("pid")
        if isinstance(pid, int) and pid > 0:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue  # a stale file left by a server that died
            except OSError:
                pass  # alive, owned by someone else
        found.append(info)
    return found


def _sessions(server: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """``GET <url>api/sessions`` straight to the server (no proxy), the token in a header."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    url = urlsplit(str(server["url"]))
    host = url.hostname or "127.0.0.1"
    if url.scheme == "https":
        context = ssl.create_default_context()
        if host in ("127.0.0.1", "localhost", "::1"):
            # A local server's certificate is usually self-signed; the connection never leaves the machine.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, url.port, timeout=timeout,
                                                                        context=context)
    else:
        conn = http.client.HTTPConnection(host, url.port, timeout=timeout)
    token = server.get("token") or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        conn.request("GET", url.path.rstrip("/") + "/api/sessions", headers=headers)
        response = conn.getresponse()
        body = response.read(4 << 20)
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
    finally:
        conn.close()
    sessions = json.loads(body)
    if not isinstance(sessions, list):
        raise ValueError("not a list of sessions")
    return [s for s in sessions if isinstance(s, dict)]


class _ServerLookup:
    """The notebook path the server gives for this kernel, with the caching described above."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server: dict[str, Any] | None = None
        self.path: str | None = None
        self.asked_at = float("-inf")
        self.asked_in: object = None  # the cell (IPython execution count) of the last answer
        self.no_scan_until = float("-inf")

    def notebook_path(self, kernel_id: str) -> str | None:
        with self.lock:
            now = time.monotonic()
            cell = _cell()
            # A rename can only be seen between cells: within one cell, one answer serves every lookup.
            if self.path is not None and now - self.asked_at < _FRESH_FOR and cell == self.asked_in:
                return self.path
            if self.server is not None:
                found = self._ask(self.server, kernel_id, _REQUEST_TIMEOUT)
                if found is not None:
                    return self._remember(self.server, found)
            if now >= self.no_scan_until:
                deadline = now + _SCAN_BUDGET
                for server in _servers():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    found = self._ask(server, kernel_id, min(_REQUEST_TIMEOUT, left))
                    if found is not None:
                        return self._remember(server, found)
                self.no_scan_until = time.monotonic() + _RESCAN_AFTER_MISS
            # No server answers now: the last answer is still the best guess (a server restart
            # gives the kernel a new id anyway).
            return self.path

    def directory(self, path: str) -> Path | None:
        """The folder of ``path`` (a session path) on this machine, from the server's ``root_dir``."""
        root = (self.server or {}).get("root_dir")
        if not isinstance(root, str) or not root:
            return None
        parts = [p for p in re.split(r"[\\/]", path)[:-1] if p]
        if any(p in (".", "..") for p in parts):
            return None
        return Path(root).expanduser().joinpath(*parts)

    def _remember(self, server: dict[str, Any], path: str) -> str:
        self.server, self.path, self.asked_at, self.asked_in = server, path, time.monotonic(), _cell()
        return path

    def _ask(self, server: dict[str, Any], kernel_id: str, timeout: float) -> str | None:
        try:
            sessions = _sessions(server, timeout)
        except Exception:  # refused, timed out, not a Jupyter server, bad JSON: try the next source
            return None
        paths = []
        for session in sessions:
            kernel = session.get("kernel") or {}
            if isinstance(kernel, dict) and kernel.get("id") == kernel_id and session.get("type", "notebook") in (
                    "notebook", "file"):
                path = session.get("path") or (session.get("notebook") or {}).get("path")
                if isinstance(path, str) and path:
                    paths.append(path)
        if not paths:
            return None
        # Several notebooks may share one kernel ("use kernel from another session"): keep the one
        # we had, so the history does not flip between them.
        return self.path if self.path in paths else sorted(paths)[0]


_server = _ServerLookup()
_unknown_tag = secrets.token_hex(4)


# --------------------------------------------------------------------------------------------
# the other sources
# --------------------------------------------------------------------------------------------


def _shell() -> Any:
    ipython = sys.modules.get("IPython")  # never import IPython just to ask
    if ipython is None:
        return None
    try:
        return ipython.get_ipython()
    except Exception:  # a half-initialised IPython must not break history lookups
        return None


def _cell() -> object:
    """Which cell runs now (IPython's execution count), or None outside IPython."""
    return getattr(_shell(), "execution_count", None)


def _vscode_notebook(shell: Any) -> str | None:
    value = getattr(shell, "user_ns", {}).get("__vsc_ipynb_file__") if shell is not None else None
    return str(value) if value else None


def _script() -> str | None:
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    if not isinstance(file, str) or not file or file.startswith("<") or Path(file).stem == "__main__":
        return None  # python -c, or python -m package: no script name to go by
    return file


def current() -> NotebookIdentity:
    """The notebook this kernel runs (see the module docstring for the order)."""
    if _explicit:
        return NotebookIdentity(_explicit, "explicit")
    kernel_id = _kernel_id()
    if kernel_id:
        path = _server.notebook_path(kernel_id)
        if path:
            name = _stem(path)
            if name:
                return NotebookIdentity(name, "server", path, kernel_id, _server.directory(path))
    session = os.environ.get("JPY_SESSION_NAME", "").strip()
    if session and _stem(session):
        return NotebookIdentity(_stem(session), "session-env", session, kernel_id)
    shell = _shell()
    vscode = _vscode_notebook(shell)
    if vscode and _stem(vscode):
        return NotebookIdentity(_stem(vscode), "vscode", vscode, kernel_id)
    if shell is None:
        script = _script()
        if script and _stem(script):
            return NotebookIdentity(_stem(script), "script", script, None)
    tag = kernel_id.replace("-", "")[:8] if kernel_id else _unknown_tag
    return NotebookIdentity(f"untitled-{tag}", "unknown", None, kernel_id)


def notebook_name() -> str:
    """The name of the running notebook (``current().name``)."""
    return current().name
