"""Serve a recorded VCR cassette on 127.0.0.1 so the real SDKs replay real traffic.

Interactions are served in order; each incoming request must have the recorded method and path
(host and query are ignored), otherwise the server answers 599 with a message naming the mismatch,
which the SDK turns into an error the test will show.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

try:
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # libyaml missing
    _Loader = yaml.SafeLoader

_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


def load_cassette(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        return yaml.load(file, Loader=_Loader)["interactions"]


def _body(part: dict[str, Any]) -> bytes:
    if "parsed_body" in part:
        return json.dumps(part["parsed_body"]).encode()
    body = part.get("body")
    if isinstance(body, dict):
        body = body.get("string", "")
    if isinstance(body, str):
        return body.encode()
    return body or b""


class ReplayServer:
    """``with ReplayServer(cassette) as server: OpenAI(base_url=server.url + "/v1", ...)``."""

    def __init__(self, cassette: str | Path) -> None:
        self.interactions = load_cassette(cassette)
        self.requests: list[tuple[str, str, Any]] = []
        self._next = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                path = urlsplit(self.path).path
                with replay._lock:
                    replay.requests.append((self.command, path, body))
                    index = replay._next
                    replay._next += 1
                if index >= len(replay.interactions):
                    return self._send(599, {}, f"cassette exhausted: no interaction #{index} for {path}".encode())
                recorded = replay.interactions[index]
                want_method = recorded["request"]["method"].upper()
                want_path = urlsplit(recorded["request"]["uri"]).path
                if (self.command, path) != (want_method, want_path):
                    message = f"expected {want_method} {want_path}, got {self.command} {path}"
                    return self._send(599, {}, message.encode())
                response = recorded["response"]
                headers = {k: v[0] if isinstance(v, list) else v for k, v in response.get("headers", {}).items()}
                self._send(response["status"]["code"], headers, _body(response))

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = _serve

        return Handler

    def __enter__(self) -> ReplayServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
