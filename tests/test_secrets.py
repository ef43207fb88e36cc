"""Issue 10, kind 5: no credential is reachable from a raised error or a repr, whatever the provider and
wherever the credential was configured. Each case walks the whole exception chain (``__cause__``,
``__context__``, every attribute, recursively, with the reprs) and ``traceback.format_exception``."""

from __future__ import annotations

import contextlib
import traceback
import types
from typing import Any

import pytest
from google.oauth2.credentials import Credentials

from nbimagine import Agent
from nbimagine.config import (
    AzureOpenAIImagesConfig,
    AzureOpenAIResponsesConfig,
    GeminiConfig,
    OpenAIImagesConfig,
    OpenAIResponsesConfig,
    VertexAIConfig,
)
from nbimagine.errors import ImagineError
from nbimagine.tools import ImageGenerationTool

SECRET = "s3cr3t-Credential-9f8e7d6c5b4a"  # no vendor prefix: only registration can mask it


def reachable_text(exc: BaseException) -> str:
    """Every string reachable from ``exc``: its chain, attributes, containers and their reprs."""
    seen: set[int] = set()
    texts: list[str] = []

    def visit(obj: Any, depth: int) -> None:
        if depth > 10 or id(obj) in seen or isinstance(obj, (int, float, bool, type(None))):
            return
        seen.add(id(obj))
        if isinstance(obj, (types.FrameType, types.TracebackType, types.ModuleType, type,
                            types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
            return
        if isinstance(obj, str):
            texts.append(obj)
            return
        if isinstance(obj, (bytes, bytearray)):
            texts.append(bytes(obj[:100_000]).decode("latin-1"))
            return
        with contextlib.suppress(Exception):
            texts.append(repr(obj))
        if isinstance(obj, BaseException):
            for linked in (obj.args, obj.__cause__, obj.__context__):
                visit(linked, depth + 1)
        if isinstance(obj, dict):
            for key, value in obj.items():
                visit(key, depth + 1)
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for item in obj:
                visit(item, depth + 1)
        for name in getattr(obj, "__slots__", ()) if isinstance(getattr(obj, "__slots__", ()), tuple) else ():
            visit(getattr(obj, name, None), depth + 1)
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            visit(attributes, depth + 1)

    visit(exc, 0)
    texts.extend(traceback.format_exception(exc))
    return "\n".join(texts)


def _cases(emu: Any) -> dict[str, tuple[Any, list[Any]]]:
    image = [ImageGenerationTool(size="1024x1024")]
    url = emu.openai_base_url
    host = emu.url.split("://")[1]
    return {
        "openai api_key": (OpenAIResponsesConfig(model="m", api_key=SECRET, base_url=url, max_retries=0), image),
        "openai header": (OpenAIResponsesConfig(model="m", api_key="k", base_url=url, max_retries=0,
                                                headers={"X-Proxy-Token": SECRET}), image),
        "openai base_url user:pass": (OpenAIResponsesConfig(model="m", api_key="k", max_retries=0,
                                                            base_url=f"http://user:{SECRET}@{host}/v1"), image),
        "openai base_url ?api_key": (OpenAIResponsesConfig(model="m", api_key="k", max_retries=0,
                                                           base_url=f"{url}?api_key={SECRET}"), image),
        "openai extra_body": (OpenAIResponsesConfig(model="m", api_key="k", base_url=url, max_retries=0,
                                                    extra_body={"metadata": {"client_secret": SECRET}}), image),
        "azure api_key": (AzureOpenAIResponsesConfig(model="m", api_key=SECRET, azure_endpoint=emu.azure_endpoint,
                                                     image_deployment="gpt-image-1", max_retries=0), image),
        "azure ad token": (AzureOpenAIResponsesConfig(model="m", azure_ad_token=SECRET, max_retries=0,
                                                      azure_endpoint=emu.azure_endpoint,
                                                      image_deployment="gpt-image-1"), image),
        "images api_key": (OpenAIImagesConfig(api_key=SECRET, base_url=url, max_retries=0), []),
        "images header": (OpenAIImagesConfig(api_key="k", base_url=url, max_retries=0,
                                             headers={"X-Proxy-Token": SECRET}), []),
        "azure images api_key": (AzureOpenAIImagesConfig("gpt-image-1", api_key=SECRET, max_retries=0,
                                                         azure_endpoint=emu.azure_endpoint), []),
        "gemini api_key": (GeminiConfig(model="gemini-2.5-flash-image", api_key=SECRET, max_retries=0,
                                        base_url=emu.gemini_base_url), []),
        "gemini header": (GeminiConfig(model="gemini-2.5-flash-image", api_key="k", max_retries=0,
                                       base_url=emu.gemini_base_url, headers={"X-Goog-User-Token": SECRET}), []),
        "gemini base_url user:pass": (GeminiConfig(model="gemini-2.5-flash-image", api_key="k", max_retries=0,
                                                   base_url=f"http://user:{SECRET}@{host}"), []),
        "vertex express api_key": (VertexAIConfig(model="gemini-2.5-flash-image", api_key=SECRET, max_retries=0,
                                                  base_url=emu.vertex_base_url), []),
        "vertex oauth token": (VertexAIConfig(model="gemini-2.5-flash-image", project="p", location="us-central1",
                                              credentials=Credentials(token=SECRET), max_retries=0,
                                              base_url=emu.vertex_base_url), []),
    }


CASES = ["openai api_key", "openai header", "openai base_url user:pass", "openai base_url ?api_key",
         "openai extra_body", "azure api_key", "azure ad token", "images api_key", "images header",
         "azure images api_key", "gemini api_key", "gemini header",
         "gemini base_url user:pass", "vertex express api_key", "vertex oauth token"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("failure", ["echoing 401", "server error", "broken stream"])
def test_no_credential_reachable_from_errors_or_reprs(emu: Any, case: str, failure: str) -> None:
    config, tools = _cases(emu)[case]
    assert SECRET not in repr(config) and SECRET in config.secrets()
    agent = Agent("a", config=config, tools=tools)
    assert SECRET not in repr(agent)
    if failure == "echoing 401":  # the provider echoes the credential back, as real APIs partly do
        emu.inject("http", status=401, message=f"Incorrect API key provided: {SECRET}. api_key={SECRET}")
    elif failure == "server error":
        emu.inject("http", status=500)
    else:
        emu.inject("broken_stream")
    with pytest.raises(Exception) as info:
        agent.ask_sync("a cat")
    assert isinstance(info.value, ImagineError)
    text = reachable_text(info.value)
    assert SECRET not in text and SECRET.replace("-", "%2D") not in text


def test_the_walker_finds_a_credential_in_a_chained_sdk_error(emu: Any) -> None:
    """The check above can fail: an SDK error chained as the cause exposes its request headers."""
    import openai

    client = openai.OpenAI(base_url=emu.openai_base_url, api_key=SECRET, max_retries=0)
    emu.inject("http", status=500)
    try:
        client.responses.create(model="m", input="x")
    except openai.APIError as sdk_error:
        wrapped = RuntimeError("wrapped")
        wrapped.__cause__ = sdk_error
        assert SECRET in reachable_text(wrapped)


def _dead_base_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def _entry_config(kind: str, base_url: str) -> tuple[Any, list[Any]]:
    if kind == "responses":
        return (OpenAIResponsesConfig(model="gpt-5", api_key=SECRET, base_url=base_url + "/v1", max_retries=0),
                [ImageGenerationTool(size="1024x1024")])
    if kind == "images":
        return OpenAIImagesConfig(api_key=SECRET, base_url=base_url + "/v1", max_retries=0), []
    return GeminiConfig(model="gemini-2.5-flash-image", api_key=SECRET, base_url=base_url, max_retries=0), []


@pytest.mark.parametrize("kind", ["responses", "images", "gemini"])
@pytest.mark.parametrize("entry", ["stream", "generate_many", "submit_batch", "job status", "job results"])
def test_no_credential_reachable_from_any_entry_point(emu: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str, entry: str) -> None:
    """Every public way a request leaves nbimagine (not only ask): the error raised or carried, and the
    history it wrote, hold no credential. The provider is unreachable, so the SDK's transport error (whose
    request holds the credential headers) is where the chain starts."""
    import asyncio

    import nbimagine
    from nbimagine._batch import BatchJob
    from nbimagine._history import History

    monkeypatch.chdir(tmp_path)
    history = History(tmp_path / "history", "secrets")
    config, tools = _entry_config(kind, _dead_base_url())
    errors: list[BaseException] = []
    if entry == "stream":
        async def consume() -> None:
            async for _ in Agent("a", config=config, tools=tools).stream("a cat"):
                pass

        with pytest.raises(ImagineError) as info:
            asyncio.run(consume())
        errors.append(info.value)
    elif entry == "generate_many":
        results = nbimagine.generate_many(["a cat"], config=config, tools=tools, progress=False, history=history)
        errors += [result.error for result in results.failures]
        assert errors
    elif entry == "submit_batch":
        with pytest.raises(ImagineError) as info:
            nbimagine.submit_batch(["a cat"], config=config, tools=tools, history=history)
        errors.append(info.value)
    else:  # a job made on a reachable provider, then followed through one that is not
        reachable, _ = _entry_config(kind, emu.url)
        emu.batch_time = 0.05
        job = nbimagine.submit_batch(["a cat"], config=reachable, tools=tools, history=history)
        dead = BatchJob(job.record, history=history, agent=Agent("a", config=config, tools=tools))
        with pytest.raises(ImagineError) as info:
            dead.status() if entry == "job status" else dead.results()
        errors.append(info.value)
    for error in errors:
        text = reachable_text(error)
        assert SECRET not in text and SECRET.replace("-", "%2D") not in text
    for path in (tmp_path / "history").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
