"""Gemini and Vertex AI through the real google-genai SDK, against the loopback emulator."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.oauth2.credentials import Credentials
from PIL import Image

from nbimagine import Agent
from nbimagine.config import GeminiConfig, VertexAIConfig
from nbimagine.errors import ConfigError, ContentPolicyError, InputError, ProviderError, UnsupportedToolError
from nbimagine.events import ImageEvent, ImageInput, PartialImageEvent, ReplyEvent, TextDeltaEvent
from nbimagine.tools import ImageGenerationTool

KEY = "AIzaTestKey-emulator-0123456789"
MODEL = "gemini-3.1-flash-image"


def gemini(emu: Any, **kw: Any) -> GeminiConfig:
    kw.setdefault("model", MODEL)
    kw.setdefault("response_modalities", ["TEXT", "IMAGE"])
    kw.setdefault("max_retries", 0)
    return GeminiConfig(api_key=KEY, base_url=emu.gemini_base_url, **kw)


def vertex(emu: Any, **kw: Any) -> VertexAIConfig:
    kw.setdefault("model", "gemini-2.5-flash-image")
    kw.setdefault("response_modalities", ["TEXT", "IMAGE"])
    kw.setdefault("max_retries", 0)
    if "api_key" not in kw:
        kw.setdefault("project", "my-proj")
        kw.setdefault("location", "us-central1")
        kw.setdefault("credentials", Credentials(token="fake-token"))
    return VertexAIConfig(base_url=emu.vertex_base_url, **kw)


def collect(stream: Any) -> list[Any]:
    async def run() -> list[Any]:
        return [event async for event in stream]

    return asyncio.run(run())


def png(width: int = 64, height: int = 48, colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def model_turn(request: Any) -> dict[str, Any]:
    [turn] = [c for c in request.json["contents"] if c["role"] == "model"]
    return turn


# --- the seed's examples, verbatim apart from imports and base_url/api_key --------------------------------


def test_seed_generate_example_and_reading_images(emu: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    async def seed() -> Any:
        config = GeminiConfig(
            model="gemini-3.1-flash-image",
            response_modalities=["TEXT", "IMAGE"],
            base_url=emu.gemini_base_url, api_key=KEY,
        )

        agent = Agent("designer", config=config)

        reply = await agent.ask("Generate an image of a friendly robot waving hello.")
        image = reply.files[0]

        for index, image in enumerate(reply.files):
            media_type = image.metadata.get("media_type", "image/png")
            extension = media_type.split("/")[-1]
            with open(f"image_{index}.{extension}", "wb") as file:
                file.write(image.data)
        return reply

    reply = asyncio.run(seed())
    [image] = reply.files
    assert (tmp_path / "image_0.jpeg").read_bytes() == image.data
    assert image.media_type == "image/jpeg" and image.data[:3] == b"\xff\xd8\xff"  # Gemini 3 answers JPEG
    assert (image.width, image.height) == (1024, 1024)
    assert Image.open(io.BytesIO(image.data)).size == (1024, 1024)
    meta = image.metadata
    assert meta["provider"] == "gemini" and meta["model"] == MODEL
    assert meta["finish_reason"] == "STOP" and meta["response_id"] == reply.response_id
    assert "friendly robot" in reply.body
    assert reply.finish_reason == "STOP" and reply.provider == "gemini"
    assert reply.usage.input_tokens > 0 and reply.usage.raw["totalTokenCount"] > 1000

    [request] = emu.requests
    assert request.path == f"/v1/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == "***"  # sent, and masked in the log
    assert request.json["generationConfig"] == {"responseModalities": ["TEXT", "IMAGE"]}
    assert request.json["contents"] == [
        {"role": "user", "parts": [{"text": "Generate an image of a friendly robot waving hello."}]}]


def test_seed_aspect_ratio_example(emu: Any) -> None:
    config = GeminiConfig(
        model="gemini-3.1-flash-image",
        response_modalities=["TEXT", "IMAGE"],
        image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K"),
        base_url=emu.gemini_base_url, api_key=KEY,
    )
    reply = Agent("designer", config=config).ask_sync("A wide mountain panorama")
    [image] = reply.files
    assert (image.width, image.height) == (2752, 1536)  # Gemini 3 image, 16:9 at 2K
    assert Image.open(io.BytesIO(image.data)).size == (2752, 1536)
    assert (image.metadata["aspect_ratio"], image.metadata["image_size"]) == ("16:9", "2K")
    assert emu.requests[0].json["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}


def test_seed_edit_example(emu: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    robot = png(300, 200, "blue")
    (tmp_path / "robot.png").write_bytes(robot)

    async def seed() -> Any:
        config = GeminiConfig(model="gemini-3.1-flash-image", response_modalities=["TEXT", "IMAGE"],
                              base_url=emu.gemini_base_url, api_key=KEY)
        agent = Agent("editor", config=config)

        reply = await agent.ask(
            "Put a party hat on the robot. Keep everything else the same.",
            ImageInput(path="robot.png"),
        )
        edited = reply.files[0]
        # ... and the edited image straight back in, as raw bytes
        again = await agent.ask("Now make the hat gold.", ImageInput(data=edited.data, media_type="image/png"))
        return edited, again

    edited, again = asyncio.run(seed())
    # The emulator keeps the input's shape for an edit: 3:2 input -> 3:2 output.
    assert (edited.width, edited.height) == (1264, 848)
    assert again.files[0].media_type == "image/jpeg"
    first, second = emu.requests
    text, inline = first.json["contents"][0]["parts"]
    assert text == {"text": "Put a party hat on the robot. Keep everything else the same."}
    blob = inline["inlineData"]
    assert blob.get("mimeType", blob.get("mime_type")) == "image/png"
    assert base64.urlsafe_b64decode(blob["data"]) == robot
    # The JPEG bytes were sent as what they are, whatever media_type= said.
    blob2 = second.json["contents"][0]["parts"][1]["inlineData"]
    assert blob2.get("mimeType", blob2.get("mime_type")) == "image/jpeg"
    assert base64.urlsafe_b64decode(blob2["data"]) == edited.data


# --- sizes and formats --------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "image_config", "size", "media_type"), [
    (MODEL, {"aspect_ratio": "9:16"}, (768, 1376), "image/jpeg"),
    (MODEL, {"aspectRatio": "21:9", "imageSize": "1K"}, (1584, 672), "image/jpeg"),
    (MODEL, types.ImageConfig(aspect_ratio="1:4"), (512, 2064), "image/jpeg"),
    ("gemini-2.5-flash-image", {"aspect_ratio": "3:2"}, (1248, 832), "image/png"),
    ("gemini-2.5-flash-image", None, (1024, 1024), "image/png"),
])
def test_aspect_ratios_give_the_documented_pixel_sizes(emu: Any, model: str, image_config: Any,
                                                       size: tuple[int, int], media_type: str) -> None:
    reply = Agent("a", config=gemini(emu, model=model, image_config=image_config)).ask_sync("a lighthouse")
    [image] = reply.files
    assert (image.width, image.height) == size
    assert image.media_type == media_type
    assert Image.open(io.BytesIO(image.data)).size == size


def test_image_only_modality(emu: Any) -> None:
    reply = Agent("a", config=gemini(emu, response_modalities=["IMAGE"])).ask_sync("a kite")
    assert reply.body == "" and len(reply.files) == 1


def test_text_modality_only_gives_no_files(emu: Any) -> None:
    reply = Agent("a", config=gemini(emu, response_modalities=["TEXT"])).ask_sync("describe a kite")
    assert reply.files == [] and "kite" in reply.body and reply.finish_reason == "STOP"


def test_instructions_become_the_system_instruction(emu: Any) -> None:
    Agent("a", config=gemini(emu), instructions="You draw in watercolour.").ask_sync("a fox")
    sent = emu.requests[0].json
    assert sent["systemInstruction"]["parts"] == [{"text": "You draw in watercolour."}]


# --- multi-turn editing and thought signatures -----------------------------------------------------


def test_follow_up_sends_the_model_turn_back_with_its_signatures(emu: Any) -> None:
    agent = Agent("editor", config=gemini(emu))
    first = agent.ask_sync("Generate an image of an axolotl.")
    second = first.ask("Now give it a sombrero.")
    second = asyncio.run(second)
    assert second.files and second.files[0].data != first.files[0].data
    assert "edited" in second.body  # the emulator drew over the previous image

    contents = emu.requests[1].json["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    parts = model_turn(emu.requests[1])["parts"]
    text_part, image_part = parts
    assert text_part["text"] == first.body
    assert text_part.get("thoughtSignature") or text_part.get("thought_signature")
    signature = image_part.get("thoughtSignature") or image_part.get("thought_signature")
    assert signature
    assert base64.urlsafe_b64decode(image_part["inlineData"]["data"]) == first.files[0].data
    # A third turn still carries both earlier model turns intact.
    third = asyncio.run(second.ask("And a tiny guitar."))
    assert third.files
    assert [c["role"] for c in emu.requests[2].json["contents"]] == ["user", "model", "user", "model", "user"]


def test_emulator_rejects_a_follow_up_without_signatures_like_gemini_3(emu: Any) -> None:
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.gemini_base_url))
    config = types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"])
    first = client.models.generate_content(model=MODEL, contents="Draw a cat", config=config)
    model_content = first.candidates[0].content
    assert all(p.thought_signature for p in model_content.parts)
    follow_up = types.Content(role="user", parts=[types.Part(text="Make it orange")])

    # What AG2 does: the image part goes back without its thought_signature.
    stripped = types.Content(role="model", parts=[p.model_copy(update={"thought_signature": None})
                                                  for p in model_content.parts])
    with pytest.raises(genai_errors.ClientError) as info:
        client.models.generate_content(model=MODEL, contents=[
            types.Content(role="user", parts=[types.Part(text="Draw a cat")]), stripped, follow_up], config=config)
    assert info.value.code == 400 and info.value.status == "INVALID_ARGUMENT"
    assert "missing a thought_signature" in info.value.message

    forged = types.Content(role="model", parts=[p.model_copy(update={"thought_signature": b"forged"})
                                                for p in model_content.parts])
    with pytest.raises(genai_errors.ClientError, match="Corrupted thought signature"):
        client.models.generate_content(model=MODEL, contents=[
            types.Content(role="user", parts=[types.Part(text="Draw a cat")]), forged, follow_up], config=config)

    # The SDK's own chat keeps the parts intact and is accepted.
    chat = client.chats.create(model=MODEL, config=config)
    chat.send_message("Draw a cat")
    assert chat.send_message("Make it orange").parts
    # Gemini 2.5 models have no signatures to check.
    plain = client.models.generate_content(model="gemini-2.5-flash-image", contents="Draw a dog", config=config)
    assert not any(p.thought_signature for p in plain.candidates[0].content.parts)


# --- thought images ----------------------------------------------------------------------------------


def test_thought_images_are_not_files(emu: Any) -> None:
    reply = Agent("a", config=gemini(emu, include_thoughts=True)).ask_sync("a castle")
    assert len(reply.files) == 1 and "thought" not in reply.files[0].metadata
    sent = emu.requests[0].json["generationConfig"]["thinkingConfig"]
    assert sent.get("includeThoughts", sent.get("include_thoughts")) is True
    # The raw answer did hold a thought image: the same request through the SDK shows it.
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.gemini_base_url))
    raw = client.models.generate_content(model=MODEL, contents="a castle", config=types.GenerateContentConfig(
        response_modalities=["TEXT", "IMAGE"], thinking_config=types.ThinkingConfig(include_thoughts=True)))
    thought_images = [p for p in raw.candidates[0].content.parts if p.thought and p.inline_data]
    assert len(thought_images) == 1
    # ... and the next turn does not carry the draft.
    asyncio.run(reply.ask("brighter"))
    assert all(not p.get("thought") for p in model_turn(emu.requests[-1])["parts"])


def test_stream_delivers_thought_images_as_partials(emu: Any) -> None:
    events = collect(Agent("a", config=gemini(emu, include_thoughts=True)).stream("a castle at dusk"))
    kinds = [type(e) for e in events]
    assert kinds == [PartialImageEvent, TextDeltaEvent, ImageEvent, ReplyEvent]
    partial, text, final, done = events
    assert partial.index == 0 and partial.image.metadata["thought"] is True
    assert partial.image.media_type == "image/jpeg" and partial.image.width == 1024
    assert "castle at dusk" in text.text
    reply = done.reply
    # The reply's image is the streamed one, priced: the same bytes and metadata plus its cost_usd.
    [priced] = reply.files
    assert priced.data == final.image.data and priced.data != partial.image.data
    assert dict(priced.metadata) == {**final.image.metadata, "cost_usd": reply.cost.usd, "cost_simulated": True}
    assert reply.body == text.text and reply.finish_reason == "STOP"
    assert emu.requests[0].path == f"/v1/models/{MODEL}:streamGenerateContent"
    assert emu.requests[0].query == {"alt": "sse"}


def test_stream_follow_up_keeps_signatures(emu: Any) -> None:
    agent = Agent("a", config=gemini(emu))
    first = collect(agent.stream("a boat"))[-1].reply
    events = collect(first.stream("with red sails"))
    assert isinstance(events[-1], ReplyEvent) and events[-1].reply.files
    parts = model_turn(emu.requests[1])["parts"]
    assert all(p.get("thoughtSignature") or p.get("thought_signature") for p in parts)


# --- safety, empty answers, faults ---------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["IMAGE_SAFETY", "PROHIBITED_CONTENT", "SAFETY", "BLOCKLIST", "SPII",
                                    "RECITATION", "IMAGE_PROHIBITED_CONTENT"])
def test_safety_finish_reasons_raise(emu: Any, reason: str) -> None:
    emu.inject(f"finish:{reason}", family="gemini")
    with pytest.raises(ContentPolicyError) as info:
        Agent("a", config=gemini(emu)).ask_sync("something")
    assert info.value.reason == reason and reason in str(info.value)
    assert info.value.provider == "gemini"


def test_image_safety_fault_in_a_stream(emu: Any) -> None:
    emu.inject("image_safety")
    with pytest.raises(ContentPolicyError) as info:
        collect(Agent("a", config=gemini(emu)).stream("something"))
    assert info.value.reason == "IMAGE_SAFETY" and "IMAGE_SAFETY" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_block_raises(emu: Any, stream: bool) -> None:
    agent = Agent("a", config=gemini(emu))
    with pytest.raises(ContentPolicyError) as info:
        if stream:
            collect(agent.stream("[fault:prompt_blocked] something"))
        else:
            agent.ask_sync("[fault:prompt_blocked] something")
    assert info.value.reason == "PROHIBITED_CONTENT" and "prompt" in info.value.message


def test_prompt_block_reason_from_injection(emu: Any) -> None:
    emu.inject("prompt_blocked:BLOCKLIST")
    with pytest.raises(ContentPolicyError) as info:
        Agent("a", config=gemini(emu)).ask_sync("something")
    assert info.value.reason == "BLOCKLIST"


@pytest.mark.parametrize("stream", [False, True])
def test_no_image_is_not_an_error(emu: Any, stream: bool) -> None:
    agent = Agent("a", config=gemini(emu))
    emu.inject("no_image")
    reply = collect(agent.stream("x"))[-1].reply if stream else agent.ask_sync("x")
    assert reply.files == [] and reply.finish_reason == "NO_IMAGE"


def test_text_only_answer_is_not_an_error(emu: Any) -> None:
    emu.inject("text_only")
    reply = Agent("a", config=gemini(emu)).ask_sync("tell me about axolotls")
    assert reply.files == [] and "axolotls" in reply.body and reply.finish_reason == "STOP"


def test_other_finish_reasons_are_reported(emu: Any) -> None:
    emu.inject("finish:MAX_TOKENS", family="gemini")
    reply = Agent("a", config=gemini(emu)).ask_sync("x")
    assert reply.finish_reason == "MAX_TOKENS" and reply.files[0].metadata["finish_reason"] == "MAX_TOKENS"


@pytest.mark.parametrize(("status", "code"), [(400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"),
                                              (403, "PERMISSION_DENIED"), (429, "RESOURCE_EXHAUSTED"),
                                              (500, "INTERNAL"), (503, "UNAVAILABLE")])
def test_http_errors_become_provider_errors(emu: Any, status: int, code: str) -> None:
    emu.inject("http", status=status, retry_after=0)
    with pytest.raises(ProviderError) as info:
        Agent("a", config=gemini(emu)).ask_sync("x")
    error = info.value
    assert not isinstance(error, ContentPolicyError)
    assert (error.status, error.code, error.provider) == (status, code, "gemini")
    assert f"HTTP {status}" in str(error) and KEY not in str(error)
    if status == 429:
        assert "quota" in error.message


def test_error_token_in_prompt_and_in_stream(emu: Any) -> None:
    with pytest.raises(ProviderError) as info:
        collect(Agent("a", config=gemini(emu)).stream("[error:404] x"))
    assert info.value.status == 404 and info.value.code == "NOT_FOUND"


def test_retries_are_configurable(emu: Any) -> None:
    emu.inject("http", status=503, times=1)
    reply = Agent("a", config=gemini(emu, max_retries=1)).ask_sync("x")
    assert reply.files and len(emu.requests) == 2

    emu.reset()
    emu.inject("http", status=503, times=1)
    with pytest.raises(ProviderError):
        Agent("a", config=gemini(emu, max_retries=0)).ask_sync("x")
    assert len(emu.requests) == 1


def test_timeout_and_retries_map_to_http_options() -> None:
    provider = Agent("a", config=GeminiConfig(model=MODEL, api_key=KEY, timeout=12.5, max_retries=3))._provider
    options = provider._http_options()
    assert options.timeout == 12500  # milliseconds
    assert options.retry_options.attempts == 4
    assert GeminiConfig(model=MODEL, max_retries=0).max_retries == 0
    none = Agent("a", config=GeminiConfig(model=MODEL, api_key=KEY, max_retries=0))._provider._http_options()
    assert none.retry_options is None


@pytest.mark.parametrize("stream", [False, True])
def test_broken_connection_is_a_provider_error(emu: Any, stream: bool) -> None:
    emu.inject("broken_stream")
    agent = Agent("a", config=gemini(emu, include_thoughts=True))
    with pytest.raises(ProviderError) as info:
        collect(agent.stream("x")) if stream else agent.ask_sync("x")
    # The API was reached: the connection dropped mid-answer (not "could not reach the API").
    assert info.value.provider == "gemini" and "dropped mid-answer" in str(info.value)


def test_error_in_the_middle_of_a_stream(emu: Any) -> None:
    emu.inject("stream_error")
    with pytest.raises(ProviderError) as info:
        collect(Agent("a", config=gemini(emu)).stream("x"))
    assert info.value.status == 500


def test_image_data_in_the_url_safe_alphabet(emu: Any) -> None:
    emu.inject("urlsafe_base64")
    reply = Agent("a", config=gemini(emu, model="gemini-2.5-flash-image")).ask_sync("x")
    [image] = reply.files
    assert image.media_type == "image/png" and Image.open(io.BytesIO(image.data)).size == (1024, 1024)


def test_undecodable_image_is_a_provider_error(emu: Any) -> None:
    emu.inject("undecodable")
    with pytest.raises(ProviderError) as info:
        Agent("a", config=gemini(emu)).ask_sync("x")
    assert info.value.code == "undecodable_image"


# --- Vertex AI --------------------------------------------------------------------------------------


def test_vertex_with_credentials_project_and_location(emu: Any) -> None:
    config = vertex(emu, image_config=types.ImageConfig(output_mime_type="image/jpeg", output_compression_quality=70,
                                                        aspect_ratio="4:3"))
    reply = Agent("v", config=config).ask_sync("a vertex of a cube")
    [image] = reply.files
    assert image.media_type == "image/jpeg" and (image.width, image.height) == (1184, 864)
    assert image.metadata["provider"] == "vertex" and reply.provider == "vertex"
    [request] = emu.requests
    assert request.path == ("/v1beta1/projects/my-proj/locations/us-central1/publishers/google/models/"
                            "gemini-2.5-flash-image:generateContent")
    assert request.headers["authorization"] == "***"
    assert request.json["generationConfig"]["imageConfig"] == {
        "aspectRatio": "4:3", "imageOutputOptions": {"mimeType": "image/jpeg", "compressionQuality": 70}}
    assert "fake-token" not in repr(config)


def test_vertex_image_output_options_object(emu: Any) -> None:
    # The SDK sends this nested object with snake_case keys; the emulator (like Google) reads both.
    options = types.ImageConfigImageOutputOptions(mime_type="image/webp", compression_quality=50)
    reply = Agent("v", config=vertex(emu, image_config=types.ImageConfig(image_output_options=options))).ask_sync("x")
    assert reply.files[0].media_type == "image/webp"


def test_vertex_without_any_credentials_is_a_config_error(emu: Any, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Any) -> None:
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no metadata-server probe
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud application-default credentials
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    config = VertexAIConfig(model="gemini-2.5-flash-image", project="p", location="us-central1",
                            base_url=emu.vertex_base_url, max_retries=0)
    with pytest.raises(ConfigError, match="gcloud auth application-default login"):
        Agent("v", config=config).ask_sync("x")
    assert emu.requests == []


def test_vertex_streaming_and_png_default(emu: Any) -> None:
    events = collect(Agent("v", config=vertex(emu)).stream("a square"))
    reply = events[-1].reply
    assert reply.files[0].media_type == "image/png"
    assert emu.requests[0].path.endswith("gemini-2.5-flash-image:streamGenerateContent")


def test_vertex_express_mode(emu: Any) -> None:
    reply = Agent("v", config=vertex(emu, api_key=KEY, model=MODEL)).ask_sync("express")
    assert reply.files and reply.files[0].metadata["provider"] == "vertex"
    [request] = emu.requests
    assert request.path == f"/v1beta1/publishers/google/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == "***"


def test_vertex_project_from_environment(emu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "env-proj")
    config = VertexAIConfig(model="gemini-2.5-flash-image", base_url=emu.vertex_base_url,
                            credentials=Credentials(token="t"), max_retries=0)
    Agent("v", config=config).ask_sync("x")
    assert emu.requests[0].path.startswith("/v1beta1/projects/env-proj/locations/global/")


def test_vertex_gs_uri_goes_as_file_data(emu: Any) -> None:
    Agent("v", config=vertex(emu)).ask_sync("edit this", ImageInput("gs://bucket/photo.png"))
    part = emu.requests[0].json["contents"][0]["parts"][1]
    file_data = part.get("fileData") or part["file_data"]
    assert (file_data.get("fileUri") or file_data["file_uri"]) == "gs://bucket/photo.png"
    assert (file_data.get("mimeType") or file_data["mime_type"]) == "image/png"


def test_vertex_missing_project_names_what_to_set(emu: Any) -> None:
    agent = Agent("v", config=VertexAIConfig(model="m", base_url=emu.vertex_base_url))
    with pytest.raises(ConfigError, match="GOOGLE_CLOUD_PROJECT") as info:
        agent.ask_sync("x")
    assert "api_key" in str(info.value) and "credentials" in str(info.value)
    assert emu.requests == []


def test_vertex_config_conflicts() -> None:
    with pytest.raises(ConfigError, match="not both"):
        VertexAIConfig(model="m", api_key="k", credentials=Credentials(token="t"))
    with pytest.raises(ConfigError, match="express mode"):
        VertexAIConfig(model="m", api_key="k", project="p")


# --- validation before any request ----------------------------------------------------------------


@pytest.mark.parametrize("image_config", [
    types.ImageConfig(output_mime_type="image/png"),
    types.ImageConfig(person_generation="ALLOW_ADULT"),
    types.ImageConfig(output_compression_quality=80),
    {"personGeneration": "ALLOW_ALL"},
    {"image_output_options": {"mime_type": "image/jpeg"}},
])
def test_vertex_only_fields_on_the_developer_api(emu: Any, image_config: Any) -> None:
    with pytest.raises(ConfigError, match=r"need.* Vertex AI") as info:
        gemini(emu, image_config=image_config)
    assert "VertexAIConfig" in str(info.value)
    vertex(emu, image_config=image_config)  # fine there
    assert emu.requests == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_config": {"aspect_ratio": "7:5"}}, "aspect_ratio must be one of"),
    ({"image_config": types.ImageConfig(image_size="8K")}, "image_size must be one of"),
    ({"image_config": {"image_size": "2k"}}, "uppercase K"),
    ({"image_config": "16:9"}, "must be a google.genai.types.ImageConfig or a dict"),
    ({"response_modalities": ["PICTURE"]}, "response_modalities entries"),
    ({"response_modalities": "IMAGE"}, "must be a list"),
    ({"image_config": types.ImageConfig(output_compression_quality=500)}, "compression quality"),
])
def test_invalid_parameters_fail_before_any_request(emu: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        (vertex if "compression" in match else gemini)(emu, **kwargs)
    assert emu.requests == []


def test_unknown_image_config_key_fails_before_the_request(emu: Any) -> None:
    agent = Agent("a", config=gemini(emu, image_config={"aspect_ratio": "1:1", "colour": "blue"}))
    with pytest.raises(ConfigError, match=r"not a valid google\.genai ImageConfig"):
        agent.ask_sync("x")
    assert emu.requests == []


def test_image_generation_tool_is_unsupported_on_gemini(emu: Any) -> None:
    for config in (gemini(emu), vertex(emu)):
        with pytest.raises(UnsupportedToolError, match="response_modalities"):
            Agent("a", config=config, tools=[ImageGenerationTool()])
    assert emu.requests == []


def test_missing_api_key_names_the_variables(emu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = Agent("a", config=GeminiConfig(model=MODEL, base_url=emu.gemini_base_url))
    with pytest.raises(ConfigError, match="GEMINI_API_KEY") as info:
        agent.ask_sync("x")
    assert "GOOGLE_API_KEY" in str(info.value)
    assert emu.requests == []
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    assert agent.ask_sync("x").files


def test_inputs_that_gemini_cannot_take(emu: Any) -> None:
    agent = Agent("a", config=gemini(emu))
    with pytest.raises(InputError, match="cannot use the image URL"):
        agent.ask_sync("x", ImageInput("ftp://example.com/cat.png"))
    with pytest.raises(InputError, match="Files API"):
        agent.ask_sync("x", ImageInput(file_id="file-abc123"))  # an OpenAI file id
    big = b"\x89PNG\r\n\x1a\n" + bytes(16 * 1024 * 1024)
    with pytest.raises(InputError, match="20 MB"):
        agent.ask_sync("x", ImageInput(data=big))
    assert emu.requests == []


def test_files_api_names_go_as_file_data(emu: Any) -> None:
    agent = Agent("a", config=gemini(emu))
    agent.ask_sync("x", ImageInput(file_id="files/abc123"),
                   ImageInput("https://generativelanguage.googleapis.com/v1beta/files/def456"))
    parts = emu.requests[0].json["contents"][0]["parts"]
    uris = [(p.get("fileData") or p["file_data"]) for p in parts[1:]]
    assert [u.get("fileUri") or u["file_uri"] for u in uris] == [
        "https://generativelanguage.googleapis.com/v1beta/files/abc123",
        "https://generativelanguage.googleapis.com/v1beta/files/def456"]


def test_secrets_stay_out_of_reprs_and_errors(emu: Any) -> None:
    config = gemini(emu)
    assert KEY not in repr(config) and "api_key=<set>" in repr(config)
    emu.inject("http", status=401, message=f"API key not valid: {KEY}")
    with pytest.raises(ProviderError) as info:
        Agent("a", config=config).ask_sync("x")
    assert KEY not in str(info.value) and KEY not in info.value.message


def test_sdk_is_not_imported_with_nbimagine() -> None:
    code = ("import sys, nbimagine, nbimagine.config, nbimagine._providers.google, nbimagine.emulator; "
            "from nbimagine.config import GeminiConfig; GeminiConfig(model='m', image_config={'aspect_ratio': '1:1'}); "
            "assert 'google.genai' not in sys.modules, 'google.genai imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the emulator's wire format, raw ------------------------------------------------------------------


def _post(url: str, body: dict[str, Any], key: str | None = KEY) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if key:
        headers["x-goog-api-key"] = key
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_emulator_sse_framing_and_key_casings(emu: Any) -> None:
    image = png()
    body = {"contents": [{"role": "user", "parts": [
        {"text": "recolour"},
        {"inline_data": {"mime_type": "image/png", "data": base64.b64encode(image).decode()}}]}],
        "generation_config": {"response_modalities": ["TEXT", "IMAGE"],
                              "thinking_config": {"includeThoughts": True}}}
    status, raw = _post(f"{emu.gemini_base_url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", body)
    assert status == 200
    text = raw.decode()
    events = [e for e in text.split("\r\n\r\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events]
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    parts = [p for c in chunks for p in c["candidates"][0].get("content", {}).get("parts", [])]
    assert [bool(p.get("thought")) for p in parts if "inlineData" in p] == [True, False]

    # camelCase and the URL-safe alphabet work the same.
    body["contents"][0]["parts"][1] = {"inlineData": {"mimeType": "image/png",
                                                      "data": base64.urlsafe_b64encode(image).decode()}}
    status, raw = _post(f"{emu.gemini_base_url}/v1/models/{MODEL}:generateContent", body)
    assert status == 200 and json.loads(raw)["candidates"][0]["finishReason"] == "STOP"


def test_emulator_auth_and_bad_requests(emu: Any) -> None:
    url = f"{emu.gemini_base_url}/v1beta/models/{MODEL}:generateContent"
    status, raw = _post(url, {"contents": [{"parts": [{"text": "x"}]}]}, key=None)
    assert status == 403 and json.loads(raw)["error"]["status"] == "PERMISSION_DENIED"
    status, raw = _post(f"{emu.vertex_base_url}/v1beta1/projects/p/locations/l/publishers/google/models/m:"
                        "generateContent", {"contents": [{"parts": [{"text": "x"}]}]}, key=None)
    assert status == 401 and json.loads(raw)["error"]["status"] == "UNAUTHENTICATED"
    status, raw = _post(url, {"contents": []})
    assert status == 400 and json.loads(raw)["error"]["status"] == "INVALID_ARGUMENT"
    status, raw = _post(url, {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "!!"}}]}]})
    assert status == 400 and "Base64" in json.loads(raw)["error"]["message"]
    status, raw = _post(url, {"contents": [{"parts": [{"text": "x"}]}],
                              "generationConfig": {"imageConfig": {"aspectRatio": "5:1"}}})
    assert status == 400
    status, raw = _post(url, {"contents": [{"parts": [{"text": "x"}]}],
                              "generationConfig": {"imageConfig": {"imageOutputOptions": {"mimeType": "image/png"}}}})
    assert status == 400 and "imageOutputOptions" in json.loads(raw)["error"]["message"]
    emu.inject("http", status=429, retry_after=0.5)
    status, raw = _post(url, {"contents": [{"parts": [{"text": "x"}]}]})
    details = json.loads(raw)["error"]["details"]
    assert status == 429 and details[-1] == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.5s"}


def test_vertex_refuses_files_api_names(emu: Any) -> None:
    # Vertex AI has no Files API: a 'files/...' name would reach it as a file_uri it cannot resolve.
    agent = Agent("v", config=vertex(emu))
    for item in (ImageInput(file_id="files/abc123"),
                 ImageInput("https://generativelanguage.googleapis.com/v1beta/files/def456")):
        with pytest.raises(InputError, match="gs://"):
            agent.ask_sync("x", item)
    assert emu.requests == []


def test_a_stream_closed_early_stops_the_http_request(emu: Any) -> None:
    # The SDK's nested stream generators hold a reference cycle: closing ours must still end the request
    # at once, not when the garbage collector happens to run.
    import gc
    import time

    emu.stream_delay = 1.5  # between frames: the draft comes after one delay, the rest after more
    agent = Agent("a", config=gemini(emu, include_thoughts=True))

    async def run() -> int:
        stream = agent.stream("a castle at dusk")
        async for event in stream:
            assert isinstance(event, PartialImageEvent)
            break
        await stream.aclose()
        deadline = time.monotonic() + 1.2
        while emu.aborted == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return emu.aborted

    gc.disable()
    try:
        assert asyncio.run(run()) == 1
    finally:
        gc.enable()
