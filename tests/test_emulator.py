"""The loopback emulator, exercised through the real ``openai`` SDK over HTTP (no mocks)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, AzureOpenAI, OpenAI
from PIL import Image

from nbimagine._cost import openai_image_tokens
from nbimagine._images import image_size, sniff_media_type
from nbimagine.emulator import Emulator, _draw

SMALL = {"type": "image_generation", "size": "256x256"}
STREAM_ORDER_ONE_IMAGE = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.image_generation_call.in_progress",
    "response.image_generation_call.generating",
    "response.image_generation_call.partial_image",
    "response.image_generation_call.partial_image",
    "response.image_generation_call.completed",
    "response.output_item.done",
    "response.output_item.added",
    "response.content_part.added",
    # output_text.delta x n (collapsed below)
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def client(emu: Emulator) -> OpenAI:
    return OpenAI(base_url=emu.openai_base_url, api_key="sk-test-key", max_retries=0)


def _image(item: Any) -> bytes:
    return base64.b64decode(item.result)


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


# -- generation (JSON) --------------------------------------------------------------------------------
def test_generate_png_json(client: OpenAI, emu: Emulator) -> None:
    r = client.responses.create(model="gpt-5", input="a red fox in the snow",
                                tools=[{"type": "image_generation", "size": "1024x1536"}])
    assert r.status == "completed" and r.id.startswith("resp_")
    assert [o.type for o in r.output] == ["image_generation_call", "message"]
    ig = r.output[0]
    assert ig.status == "completed" and ig.id.startswith("ig_")
    assert (ig.size, ig.quality, ig.background, ig.output_format, ig.action) == (
        "1024x1536", "medium", "opaque", "png", "generate")
    assert "a red fox in the snow" in ig.revised_prompt
    data = _image(ig)
    assert sniff_media_type(data) == "image/png" and image_size(data) == (1024, 1536)
    assert r.output_text and r.usage and r.usage.total_tokens > 0
    # The tool's default model (no model sent) is echoed, and its image tokens for 1024x1536 medium reported.
    [tool] = r.tools
    assert r.tool_usage and r.tool_usage.image_gen.output_tokens == openai_image_tokens(
        tool.model, "medium", "1024x1536")[0]
    assert r.tools[0].size == "1024x1536"  # echoed with defaults filled in
    rec = emu.requests[-1]
    assert (rec.method, rec.path) == ("POST", "/v1/responses")
    assert rec.headers["authorization"] == "***" and rec.json["input"] == "a red fox in the snow"


def test_size_auto_resolves(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="auto size", tools=[{"type": "image_generation", "size": "auto"}])
    assert r.output[0].size == "1024x1024" and image_size(_image(r.output[0])) == (1024, 1024)


@pytest.mark.parametrize(("fmt", "media"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_jpeg_and_webp_with_compression(client: OpenAI, fmt: str, media: str) -> None:
    sizes = []
    for compression in (10, 95):
        r = client.responses.create(model="m", input="formats", tools=[
            {**SMALL, "size": "512x256", "output_format": fmt, "output_compression": compression}])
        data = _image(r.output[0])
        assert sniff_media_type(data) == media and image_size(data) == (512, 256)
        assert r.output[0].output_format == fmt
        sizes.append(len(data))
    assert sizes[0] < sizes[1]  # output_compression is honoured


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_transparent_background(client: OpenAI, fmt: str) -> None:
    r = client.responses.create(model="m", input="a sticker", tools=[
        {**SMALL, "background": "transparent", "output_format": fmt}])
    assert r.output[0].background == "transparent"
    img = Image.open(io.BytesIO(_image(r.output[0])))
    assert img.mode == "RGBA" and img.getchannel("A").getextrema()[0] == 0


def test_text_only_without_tool_or_with_tool_choice_none(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="hello there")
    assert [o.type for o in r.output] == ["message"] and "hello there" in r.output_text
    r = client.responses.create(model="m", input="hello there", tools=[SMALL], tool_choice="none")
    assert [o.type for o in r.output] == ["message"]


def test_several_images(client: OpenAI) -> None:
    r = client.responses.create(model="m", input="three cats [images:3]", tools=[SMALL],
                                tool_choice={"type": "image_generation"})
    calls = [o for o in r.output if o.type == "image_generation_call"]
    assert len(calls) == 3 and r.output[-1].type == "message"
    images = [_image(c) for c in calls]
    assert len(set(images)) == 3 and len({c.id for c in calls}) == 3
    assert "[images:3]" not in calls[0].revised_prompt


@pytest.mark.parametrize(("tool", "param"), [
    ({"size": "1000x1000"}, "tools[0].size"),
    ({"size": "4096x1024"}, "tools[0].size"),
    ({"size": "496x160"}, "tools[0].size"),  # ratio > 3:1
    ({"output_format": "jpeg", "background": "transparent"}, "tools[0].background"),
    ({"output_compression": 500}, "tools[0].output_compression"),
    ({"partial_images": 9}, "tools[0].partial_images"),
    ({"quality": "ultra"}, "tools[0].quality"),
])
def test_validation_like_the_real_api(client: OpenAI, tool: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="x", tools=[{"type": "image_generation", **tool}])
    assert info.value.status_code == 400 and info.value.param == param and info.value.code == "invalid_value"


def test_free_form_sizes_accepted(client: OpenAI) -> None:
    for size in ("480x160", "160x480", "1536x1024"):
        r = client.responses.create(model="m", input="sizes", tools=[{"type": "image_generation", "size": size}])
        w, h = map(int, size.split("x"))
        assert image_size(_image(r.output[0])) == (w, h)


# -- streaming ----------------------------------------------------------------------------------------
def _collapse(types: list[str]) -> list[str]:
    return [t for t in types if t != "response.output_text.delta"]


def test_stream_create(client: OpenAI) -> None:
    tool = {**SMALL, "partial_images": 2}
    events = list(client.responses.create(model="m", input="a lighthouse", tools=[tool], stream=True))
    types = [e.type for e in events]
    assert _collapse(types) == STREAM_ORDER_ONE_IMAGE
    assert "response.output_text.delta" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    partials = [e for e in events if e.type == "response.image_generation_call.partial_image"]
    assert [p.partial_image_index for p in partials] == [0, 1]
    assert all(p.size == "256x256" and p.output_format == "png" for p in partials)
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed"
    assert [o.type for o in final.output] == ["image_generation_call", "message"]
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1]
    full = _image(final.output[0])
    assert {base64.b64decode(p.partial_image_b64) for p in partials}.isdisjoint({full})
    # Same answer as the JSON path: the drawing is deterministic.
    again = client.responses.create(model="m", input="a lighthouse", tools=[tool])
    assert _image(again.output[0]) == full


def test_stream_helper_sync_and_async(emu: Emulator) -> None:
    client = OpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
    with client.responses.stream(model="m", input="a boat [images:2]", tools=[{**SMALL, "partial_images": 1}]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds.count("response.image_generation_call.partial_image") == 2
    assert [o.type for o in final.output] == ["image_generation_call", "image_generation_call", "message"]
    assert final.output_text

    async def run() -> Any:
        aclient = AsyncOpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
        async with aclient.responses.stream(model="m", input="async boat", tools=[SMALL]) as stream:
            async for _ in stream:
                pass
            result = await stream.get_final_response()
        plain = await aclient.responses.create(model="m", input="async boat", tools=[SMALL])
        await aclient.close()
        return result, plain

    result, plain = asyncio.run(run())
    assert _image(result.output[0]) == _image(plain.output[0])


def test_stream_text_only(client: OpenAI) -> None:
    events = list(client.responses.create(model="m", input="just talk", stream=True))
    assert [e.type for e in events][:3] == ["response.created", "response.in_progress",
                                            "response.output_item.added"]
    assert events[-1].type == "response.completed" and "just talk" in events[-1].response.output_text


# -- conversation state -------------------------------------------------------------------------------
def test_previous_response_id_edits_the_stored_image(client: OpenAI) -> None:
    first = client.responses.create(model="m", input="a castle", tools=[SMALL])
    second = client.responses.create(model="m", input="make it night", tools=[SMALL],
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    ig = second.output[0]
    assert ig.action == "edit" and "Edit" in ig.revised_prompt
    fresh = client.responses.create(model="m", input="make it night", tools=[SMALL])
    assert fresh.output[0].action == "generate" and _image(fresh.output[0]) != _image(ig)
    # A text-only turn keeps the conversation's image for the next edit.
    chat = client.responses.create(model="m", input="thanks", previous_response_id=second.id)
    third = client.responses.create(model="m", input="add a moon", tools=[SMALL], previous_response_id=chat.id)
    assert third.output[0].action == "edit"


def test_previous_response_id_with_store_false_is_not_found(client: OpenAI) -> None:
    first = client.responses.create(model="m", input="a castle", tools=[SMALL], store=False)
    assert first.store is False
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="again", tools=[SMALL], previous_response_id=first.id)
    err = info.value
    assert err.code == "previous_response_not_found" and err.param == "previous_response_id"
    assert err.body["message"] == f"Previous response with id '{first.id}' not found."
    assert err.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input="again", previous_response_id="resp_unknown")


def test_item_references(client: OpenAI) -> None:
    unstored = client.responses.create(model="m", input="a tree", tools=[SMALL], store=False)
    ig_id = unstored.output[0].id
    for ref in ({"type": "image_generation_call", "id": ig_id}, {"type": "item_reference", "id": ig_id}):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="m", tools=[SMALL], input=[
                {"role": "user", "content": "a tree"}, ref, {"role": "user", "content": "make it autumn"}])
        assert info.value.body["message"] == f"Item with id '{ig_id}' not found."

    # The full item (with its result) is accepted and becomes the edit base.
    full = unstored.output[0].model_dump(exclude_none=True)
    r = client.responses.create(model="m", tools=[SMALL], input=[full, {"role": "user", "content": "autumn"}])
    assert r.output[0].action == "edit"
    with pytest.raises(openai.BadRequestError) as info:  # a result that is not an image
        client.responses.create(model="m", tools=[SMALL],
                                input=[{**full, "result": "bm9wZQ=="}, {"role": "user", "content": "x"}])
    assert info.value.param == "input[0].result"

    stored = client.responses.create(model="m", input="a tree", tools=[SMALL])
    r = client.responses.create(model="m", tools=[SMALL], input=[
        {"type": "image_generation_call", "id": stored.output[0].id}, {"role": "user", "content": "winter"}])
    assert r.output[0].action == "edit"


def test_input_images_data_url_and_file_id(client: OpenAI) -> None:
    src = _draw.render("source photo", 300, 200)
    urlsafe = base64.urlsafe_b64encode(src).decode()
    results = []
    for part in ({"type": "input_image", "image_url": f"data:image/png;base64,{urlsafe}", "detail": "auto"},
                 {"type": "input_image", "file_id": "file-abc123", "detail": "high"}):
        r = client.responses.create(model="m", tools=[SMALL], input=[
            {"role": "user", "content": [{"type": "input_text", "text": "add a hat"}, part]}])
        assert r.output[0].action == "edit"
        results.append(_image(r.output[0]))
    assert results[0] != results[1]
    again = client.responses.create(model="m", tools=[SMALL], input=[{"role": "user", "content": [
        {"type": "input_text", "text": "add a hat"}, {"type": "input_image", "file_id": "file-abc123"}]}])
    assert _image(again.output[0]) == results[1]  # a file id always stands for the same picture
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", tools=[SMALL], input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl", "detail": "auto"}]}])


def test_chat_completions_text(client: OpenAI) -> None:
    c = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "hi there"}])
    assert "hi there" in c.choices[0].message.content and c.usage.total_tokens > 0
    chunks = list(client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "hi" in text and chunks[-1].usage is not None
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "[error:429]"}])


# -- Azure ------------------------------------------------------------------------------------------
def test_azure_url_shapes_and_deployment_header(emu: Emulator) -> None:
    header = {"x-ms-oai-image-generation-deployment": "gpt-image-1"}
    v1 = AzureOpenAI(base_url=emu.azure_endpoint + "/openai/v1/", api_version="preview", api_key="az-key",
                     default_headers=header, max_retries=0)
    classic = AzureOpenAI(azure_endpoint=emu.azure_endpoint, api_version="2025-04-01-preview", api_key="az-key",
                          max_retries=0)
    r1 = v1.responses.create(model="gpt-4.1", input="an azure sky", tools=[SMALL])
    r2 = classic.responses.create(model="gpt-4.1", input="an azure sky", tools=[SMALL], extra_headers=header)
    assert image_size(_image(r1.output[0])) == image_size(_image(r2.output[0])) == (256, 256)
    assert _image(r1.output[0]) != _image(r2.output[0])  # a second identical request is another variant
    first, second = emu.requests[-2:]
    assert (first.path, first.query) == ("/openai/v1/responses", {"api-version": "preview"})
    assert (second.path, second.query) == ("/openai/responses", {"api-version": "2025-04-01-preview"})
    assert second.headers["api-key"] == "***"
    with pytest.raises(openai.BadRequestError) as info:
        classic.responses.create(model="gpt-4.1", input="no header", tools=[SMALL])
    assert "x-ms-oai-image-generation-deployment" in info.value.message
    text = classic.responses.create(model="gpt-4.1", input="text needs no header")
    assert text.output_text


# -- faults ---------------------------------------------------------------------------------------------
def test_http_fault_injected_and_by_token(client: OpenAI, emu: Emulator) -> None:
    emu.inject("http", status=503, message="emulated outage")
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.create(model="m", input="x", tools=[SMALL])
    assert info.value.status_code == 503 and "emulated outage" in info.value.message
    assert info.value.request_id and info.value.request_id.startswith("req_emu_")
    assert client.responses.create(model="m", input="x", tools=[SMALL]).status == "completed"  # times=1
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="missing [error:404]", tools=[SMALL])
    emu.inject("http", status=500, family="gemini")  # another vendor's fault is not consumed here
    assert client.responses.create(model="m", input="x").status == "completed"


def test_retry_after_429_then_success(emu: Emulator) -> None:
    client = OpenAI(base_url=emu.openai_base_url, api_key="k")  # default max_retries=2
    emu.inject("http", status=429, retry_after=0.01)
    r = client.responses.create(model="m", input="retry me", tools=[SMALL])
    assert r.status == "completed"  # after one retry (the headers below), waiting the 10 ms asked for
    assert [q.headers["x-stainless-retry-count"] for q in emu.requests] == ["0", "1"]
    with pytest.raises(openai.RateLimitError) as info:
        client.responses.create(model="m", input="always [error:429]")
    assert info.value.response.headers["retry-after-ms"] == "10"
    assert len(emu.requests) == 5  # 2 + three attempts


def test_moderation_fault(client: OpenAI, emu: Emulator) -> None:
    for trigger in ("inject", "token"):
        prompt = "x"
        if trigger == "inject":
            emu.inject("moderation")
        else:
            prompt = "x [fault:moderation]"
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="m", input=prompt, tools=[SMALL])
        assert info.value.code == "moderation_blocked" and info.value.type == "image_generation_user_error"
        assert info.value.body["moderation_details"]["moderation_stage"] == "input"


@pytest.mark.parametrize(("fault", "code"), [("image_moderation", "moderation_blocked"),
                                             ("image_failed", "server_error")])
@pytest.mark.parametrize("stream", [False, True])
def test_failed_image_call(client: OpenAI, emu: Emulator, fault: str, code: str, stream: bool) -> None:
    emu.inject(fault)
    if stream:
        with client.responses.stream(model="m", input="x", tools=[{**SMALL, "partial_images": 2}]) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.image_generation_call.partial_image" not in kinds
    else:
        r = client.responses.create(model="m", input="x", tools=[SMALL])
    ig = r.output[0]
    assert r.status == "completed" and ig.status == "failed" and ig.result is None
    assert ig.error.code == code
    emu.inject(fault)  # with several calls only the last one fails: the earlier images survive
    r = client.responses.create(model="m", input="two [images:2]", tools=[SMALL])
    assert [o.status for o in r.output[:2]] == ["completed", "failed"]


def test_broken_stream_and_truncated_json(client: OpenAI, emu: Emulator) -> None:
    emu.inject("broken_stream")
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):  # the SDK wraps the transport's "incomplete body" error
        for event in client.responses.create(model="m", input="x", tools=[{**SMALL, "partial_images": 2}],
                                             stream=True):
            seen.append(event.type)
    assert seen[-1] == "response.image_generation_call.partial_image" and seen.count(seen[-1]) == 1
    emu.inject("broken_stream")
    with pytest.raises(openai.APIConnectionError):
        client.responses.create(model="m", input="x", tools=[SMALL])
    assert emu.aborted == 0  # the server dropped these; no client went away


def test_stream_error_event_then_failed(client: OpenAI, emu: Emulator) -> None:
    emu.inject("stream_error")
    events = list(client.responses.create(model="m", input="x", tools=[SMALL], stream=True))
    types = [e.type for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert events[-2].code == "server_error" and events[-1].response.error.code == "server_error"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    r = client.responses.create(model="m", input="x [fault:stream_error]", tools=[SMALL])
    assert r.status == "failed" and r.error.code == "server_error"


def test_undecodable_and_text_only_faults(client: OpenAI, emu: Emulator) -> None:
    emu.inject("undecodable")
    r = client.responses.create(model="m", input="x", tools=[SMALL])
    assert r.output[0].status == "completed" and sniff_media_type(_image(r.output[0])) is None
    emu.inject("text_only", times=2)
    for _ in range(2):
        r = client.responses.create(model="m", input="x", tools=[SMALL], tool_choice="required")
        assert [o.type for o in r.output] == ["message"]
    assert client.responses.create(model="m", input="x", tools=[SMALL]).output[0].type == "image_generation_call"


def test_missing_key_is_401_with_request_id(emu: Emulator) -> None:
    status, headers, body = _post(emu.openai_base_url + "/responses", {"model": "m", "input": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert {k.lower() for k in headers} >= {"x-request-id", "content-length"}
    status, _, body = _post(emu.openai_base_url + "/responses", {"model": "m", "input": "x"},
                            {"authorization": "Bearer sk-x"})
    assert status == 200 and body["object"] == "response"
    status, _, body = _post(emu.url + "/nowhere", {})
    assert status == 404 and "error" in body


# -- latency, cancellation, connections ---------------------------------------------------------------
def _wait_for(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_latency_and_client_disconnect_counts_abort(client: OpenAI, emu: Emulator) -> None:
    emu.latency = 0.3
    start = time.monotonic()
    client.responses.create(model="m", input="slow")
    assert time.monotonic() - start >= 0.3
    emu.latency = 5
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).responses.create(model="m", input="slow", tools=[SMALL])
    assert _wait_for(lambda: emu.aborted == 1)

    async def cancel() -> None:
        aclient = AsyncOpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
        task = asyncio.create_task(aclient.responses.create(model="m", input="slow"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await aclient.close()

    asyncio.run(cancel())
    assert _wait_for(lambda: emu.aborted == 2)
    emu.reset()
    assert emu.latency == 0 and emu.aborted == 0 and emu.requests == []


def test_stream_delay_paces_frames_and_mid_stream_close_counts_abort(client: OpenAI, emu: Emulator) -> None:
    emu.stream_delay = 0.05
    stream = client.responses.create(model="m", input="slow stream", tools=[{**SMALL, "partial_images": 3}],
                                      stream=True)
    start = time.monotonic()
    for event in stream:
        if event.type == "response.image_generation_call.partial_image":
            break
    assert time.monotonic() - start >= 0.2  # five frames, four pauses
    stream.close()
    assert _wait_for(lambda: emu.aborted == 1)


def test_close_connections_lets_async_clients_span_event_loops() -> None:
    with Emulator(close_connections=True) as emu:
        aclient = AsyncOpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
        for _ in range(2):
            r = asyncio.run(aclient.responses.create(model="m", input="loop"))
            assert r.output_text
        raw = OpenAI(base_url=emu.openai_base_url, api_key="k").responses.with_raw_response.create(
            model="m", input="x")
        assert raw.headers["connection"] == "close"


def test_stop_closes_pooled_connections() -> None:
    emu = Emulator().start()
    client = OpenAI(base_url=emu.openai_base_url, api_key="k", max_retries=0)
    assert client.responses.create(model="m", input="before").output_text
    emu.stop()
    with pytest.raises(openai.APIConnectionError):
        client.responses.create(model="m", input="after")
    emu.stop()  # idempotent


# -- drawings -----------------------------------------------------------------------------------------
def test_drawings_are_deterministic_and_marked() -> None:
    a = _draw.render("a blue whale", 320, 240)
    _draw._render.cache_clear()
    assert _draw.render("a blue whale", 320, 240) == a
    assert _draw.render("a blue whale!", 320, 240) != a
    partial = _draw.render("a blue whale", 320, 240, stage=0.3)
    assert partial != a and image_size(partial) == (320, 240)
    edit = _draw.render("make it red", 320, 240, base=a)
    assert edit not in (a, _draw.render("make it red", 320, 240))
    # The "nbimagine emulator" label: a dark box with yellow text in the bottom-right corner.
    img = Image.open(io.BytesIO(a)).convert("RGB")
    corner = img.crop((200, 220, 320, 240))
    colours = corner.getcolors(maxcolors=corner.width * corner.height) or []
    assert any(r > 200 and g > 200 and b < 80 for _, (r, g, b) in colours)
    with pytest.raises(ValueError):
        _draw.render("x", 10, 10, base=b"not an image")
    start = time.perf_counter()
    _draw.render("benchmark", 1024, 1024)
    _draw.render("benchmark", 1024, 1024)
    assert time.perf_counter() - start < 2


# -- standalone -------------------------------------------------------------------------------------
def test_standalone_module(tmp_path: Any) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "nbimagine.emulator", "--port", "0", "--close"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", first)
        assert match, first
        url = match.group(0)
        lines = [proc.stdout.readline() for _ in range(9)]
        assert any(f"OPENAI_BASE_URL={url}/v1" in line for line in lines)
        r = OpenAI(base_url=url + "/v1", api_key="k", max_retries=0).responses.create(
            model="m", input="standalone", tools=[SMALL])
        assert r.output[0].status == "completed"
        proc.terminate()  # SIGTERM stops it cleanly, like Ctrl-C
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_emulator_traffic_bypasses_an_http_proxy() -> None:
    # Behind a corporate proxy httpx2 would send 127.0.0.1 traffic to the proxy; here it refuses.
    code = """
import os
from nbimagine import Agent
from nbimagine.config import OpenAIResponsesConfig
from nbimagine.emulator import Emulator
from nbimagine.tools import ImageGenerationTool
with Emulator() as emu:
    config = OpenAIResponsesConfig("gpt-4.1", api_key="k", base_url=emu.openai_base_url, max_retries=0)
    print(len(Agent("a", config=config, tools=[ImageGenerationTool()]).ask_sync("x").files))
"""
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]
