"""Issue 10, kind 4: the same ``ImageInput(url=...)`` works on every provider. OpenAI fetches URLs itself
(the URL is sent); Gemini and Vertex do not, and the Images API uploads its images, so there nbimagine fetches
it once, bounded, and sends the bytes."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from google.oauth2.credentials import Credentials
from PIL import Image

from nbimagine import Agent
from nbimagine._providers import _fetch
from nbimagine.config import (
    AzureOpenAIImagesConfig,
    AzureOpenAIResponsesConfig,
    GeminiConfig,
    OpenAIImagesConfig,
    OpenAIResponsesConfig,
    VertexAIConfig,
)
from nbimagine.errors import InputError
from nbimagine.events import ImageInput
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"
_buffer = io.BytesIO()
Image.new("RGB", (96, 64), "purple").save(_buffer, "PNG")
PNG = _buffer.getvalue()
_mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
_mask.paste((0, 0, 0, 0), (0, 0, 48, 32))  # transparent: the region to change
_buffer = io.BytesIO()
_mask.save(_buffer, "PNG")
MASK = _buffer.getvalue()


class _Files(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        _Files.hits.append(path)
        routes = {
            "/cat.png": (200, {"content-type": "image/png"}, PNG),
            "/mask.png": (200, {"content-type": "image/png"}, MASK),
            "/octet": (200, {"content-type": "application/octet-stream"}, PNG),
            "/page.html": (200, {"content-type": "text/html"}, b"<html>not an image</html>"),
            "/liar.png": (200, {"content-type": "image/png"}, b"GIF? no: plain text"),
            "/huge": (200, {"content-type": "image/png", "content-length": str(80 * 1024 * 1024)}, b""),
            "/to-file": (302, {"location": "file:///etc/passwd"}, b""),
            "/to-cat": (302, {"location": "/cat.png"}, b""),
            "/missing": (404, {"content-type": "text/plain"}, b"nope"),
        }
        if path == "/endless":  # no content-length: the cap applies while reading
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            chunk = PNG[:8] + bytes(1024 * 1024)
            with contextlib.suppress(OSError):  # the client hangs up at its cap
                for _ in range(30):
                    self.wfile.write(chunk)
            return
        status, headers, body = routes.get(path, (404, {}, b""))
        self.send_response(status)
        headers.setdefault("content-length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if path != "/huge":
            self.wfile.write(body)


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _agent(emu: Any, provider: str) -> Agent:
    tools = [ImageGenerationTool(size="1024x1024")]
    if provider == "openai":
        return Agent("a", config=OpenAIResponsesConfig(model="m", api_key=KEY, base_url=emu.openai_base_url,
                                                       max_retries=0), tools=tools)
    if provider == "azure":
        return Agent("a", config=AzureOpenAIResponsesConfig(model="m", api_key=KEY, azure_endpoint=emu.azure_endpoint,
                                                            image_deployment="gpt-image-1", max_retries=0),
                     tools=tools)
    if provider == "images":
        return Agent("a", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0))
    if provider == "azure_images":
        return Agent("a", config=AzureOpenAIImagesConfig("gpt-image-1", api_key=KEY, azure_endpoint=emu.azure_endpoint,
                                                         max_retries=0))
    if provider == "gemini":
        return Agent("a", config=GeminiConfig(model="gemini-2.5-flash-image", api_key="AIzaTest-0123456789",
                                              base_url=emu.gemini_base_url, max_retries=0))
    return Agent("a", config=VertexAIConfig(model="gemini-2.5-flash-image", project="p", location="us-central1",
                                            credentials=Credentials(token="t"), base_url=emu.vertex_base_url,
                                            max_retries=0))


PROVIDERS = ["openai", "azure", "images", "azure_images", "gemini", "vertex"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_same_url_input_works_on_every_provider(emu: Any, files: str, provider: str) -> None:
    url = f"{files}/cat.png"
    _Files.hits.clear()
    reply = _agent(emu, provider).ask_sync("put a hat on it", ImageInput(url))
    image = reply.files[0]
    sent = json.dumps(emu.requests[-1].json)
    if provider in ("openai", "azure"):  # the API fetches it: the URL travels, nbimagine does not download it
        assert url in sent and _Files.hits == ["/cat.png"]  # the emulator fetched it, as OpenAI would
    elif provider in ("images", "azure_images"):  # uploaded as a file: fetched once by nbimagine
        assert url not in sent and "image/png" in sent and _Files.hits == ["/cat.png"]
        assert emu.requests[-1].path.endswith("/images/edits")
    else:  # fetched once by nbimagine, sent inline
        assert url not in sent and ("inlineData" in sent or "inline_data" in sent) and _Files.hits == ["/cat.png"]
    assert image.width and image.metadata.get("provider") == provider.removesuffix("_images").replace(
        "images", "openai")


@pytest.mark.parametrize("provider", ["images", "gemini"])
def test_a_url_mask_is_fetched_too(emu: Any, files: str, provider: str) -> None:
    """The mask travels as bytes on both (an upload, a drawn guide): a URL mask is fetched like the image."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reply = _agent(emu, provider).ask_sync("a hat", ImageInput(f"{files}/cat.png"),
                                               mask=ImageInput(f"{files}/mask.png"))
    assert reply.files and reply.files[0].metadata.get("mask") in ("native", "guide")


@pytest.mark.parametrize(("path", "fragment"), [
    ("/page.html", "is not an image: the server says text/html"),
    ("/liar.png", "did not return a PNG, JPEG, WebP or GIF image"),
    ("/huge", "the limit is 50.0 MB"),
    ("/endless", "larger than the 20.0 MB limit"),
    ("/to-file", "file:.*(not allowed|not followed)"),
    ("/missing", "HTTP 404"),
])
def test_fetching_is_bounded_and_checked(files: str, path: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        _fetch.fetch_image(files + path, max_bytes=(20 if path == "/endless" else 50) * 1024 * 1024)


def test_fetch_follows_http_redirects_and_octet_streams(files: str) -> None:
    assert _fetch.fetch_image(f"{files}/to-cat").data == PNG
    assert _fetch.fetch_image(f"{files}/octet").data == PNG
    with pytest.raises(InputError, match="only http and https"):
        _fetch.fetch_image("file:///etc/passwd")


def test_fetch_times_out_on_a_silent_server() -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        with pytest.raises(InputError, match="Cannot fetch"):
            _fetch.fetch_image(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", timeout=0.2)
    finally:
        listener.close()


def test_a_failed_fetch_is_an_input_error_before_the_request(emu: Any, files: str) -> None:
    with pytest.raises(InputError, match="text/html"):
        _agent(emu, "gemini").ask_sync("edit", ImageInput(f"{files}/page.html?sig=SECRETSIG"))
    assert not emu.requests


def test_signed_url_parameters_never_appear_in_the_error(files: str) -> None:
    with pytest.raises(InputError) as info:
        _fetch.fetch_image(f"{files}/page.html?X-Amz-Signature=abc123&token=tok456")
    assert "abc123" not in str(info.value) and "tok456" not in str(info.value)
