"""The OpenAI / Azure providers through the real ``openai`` SDK, over HTTP, against the emulator."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
from PIL import Image

from nbimagine import Agent
from nbimagine.config import AzureOpenAIResponsesConfig, OpenAIConfig, OpenAIResponsesConfig
from nbimagine.errors import ConfigError, ContentPolicyError, InputError, ProviderError
from nbimagine.events import BinaryResult, ImageEvent, ImageInput, PartialImageEvent, ReplyEvent, TextDeltaEvent
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"


def agent(emu, *, store: bool = True, max_retries: int = 0, tool_choice: str | None = None, **tool: object) -> Agent:
    config = OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, store=store,
                                   max_retries=max_retries, tool_choice=tool_choice)
    return Agent("designer", config=config, tools=[ImageGenerationTool(**tool)])


def responses(emu) -> list:
    return [r for r in emu.requests if r.path.endswith("/responses")]


# --- the seed examples, unchanged apart from imports (the environment points the SDK at the emulator) ---

@pytest.fixture
def seed_env(emu, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_BASE_URL", emu.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return emu


async def test_seed_generate_then_edit(seed_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    agent = Agent(
        "designer",
        config=OpenAIResponsesConfig(model="gpt-4.1"),
        tools=[
            ImageGenerationTool(
                quality="high",
                size="1024x1024",
                output_format="png",
                background="transparent",
            ),
        ],
    )

    reply = await agent.ask("Generate a logo for a coffee shop.")
    image = reply.files[0]

    for index, image in enumerate(reply.files):
        media_type = image.metadata.get("media_type", "image/png")
        extension = media_type.split("/")[-1]
        with open(f"image_{index}.{extension}", "wb") as file:
            file.write(image.data)

    Path("image_0.png").rename("robot.png")

    editor = Agent(
        "editor",
        config=OpenAIResponsesConfig(model="gpt-4.1"),
        tools=[ImageGenerationTool(size="1024x1024", output_format="png")],
    )

    reply = await editor.ask(
        "Put a party hat on the robot. Keep everything else the same.",
        ImageInput(path="robot.png"),
    )
    edited = reply.files[0]

    logo = Image.open("robot.png")
    assert logo.size == (1024, 1024) and logo.mode == "RGBA"
    assert logo.getpixel((0, 0))[3] == 0  # transparent background honoured
    assert edited.metadata["action"] == "edit" and edited.data != Path("robot.png").read_bytes()
    sent = responses(seed_env)[-1].json
    assert sent["input"][0]["content"][1]["image_url"].startswith("data:image/png;base64,")
    assert sent["tools"] == [{"type": "image_generation", "size": "1024x1024", "output_format": "png"}]

    # And the raw bytes fed straight back in, as the seed's last paragraph says.
    again = await editor.ask("Make it blue.", ImageInput(data=edited.data, media_type="image/png"))
    assert again.files[0].metadata["action"] == "edit"


# --- results and metadata --------------------------------------------------------------------

@pytest.mark.parametrize("fmt, media_type, magic", [
    ("png", "image/png", b"\x89PNG"), ("jpeg", "image/jpeg", b"\xff\xd8\xff"), ("webp", "image/webp", b"RIFF"),
])
def test_formats_and_metadata(emu, fmt: str, media_type: str, magic: bytes) -> None:
    reply = agent(emu, output_format=fmt, size="1536x1024", quality="low").ask_sync("A red bicycle on a beach")
    [image] = reply.files
    assert image.data.startswith(magic) and image.media_type == media_type
    assert (image.width, image.height) == (1536, 1024) == Image.open(io.BytesIO(image.data)).size
    meta = image.metadata
    assert meta["provider"] == "openai" and meta["model"] == "gpt-4.1"
    assert meta["output_format"] == fmt and meta["size"] == "1536x1024" and meta["quality"] == "low"
    assert meta["action"] == "generate" and meta["revised_prompt"] and meta["call_id"].startswith("ig_")
    assert meta["response_id"] == reply.response_id
    assert reply.body and reply.finish_reason == "completed" and reply.usage.total_tokens > 0


def test_several_images_in_order(emu) -> None:
    reply = agent(emu).ask_sync("Three posters [images:3]")
    assert len(reply.files) == 3
    # The emulator keeps the output it sent, in order (store=True, as on the real API).
    output = emu.state.store[f"openai:resp:{reply.response_id}"]["output"]
    calls = [item["id"] for item in output if item["type"] == "image_generation_call"]
    assert [f.metadata["call_id"] for f in reply.files] == calls
    assert len({f.data for f in reply.files}) == 3


def test_text_only_reply_is_not_an_error(emu) -> None:
    reply = agent(emu, tool_choice="none").ask_sync("Tell me a story")
    assert reply.files == [] and "story" in reply.body
    emu.inject("text_only")
    assert agent(emu).ask_sync("Draw a cat").files == []


def test_only_what_the_user_set_is_sent(emu) -> None:
    mask = ImageInput(data=_png(64, 64, "RGBA"))
    agent(emu, quality="high", moderation="low", input_fidelity="high", action="auto",
          input_image_mask=mask, tool_choice="image_generation").ask_sync("x")
    sent = responses(emu)[-1].json
    tool = sent["tools"][0]
    assert {k for k in tool if k != "input_image_mask"} == {"type", "quality", "moderation", "input_fidelity", "action"}
    assert tool["input_image_mask"]["image_url"].startswith("data:image/png;base64,")
    assert sent["tool_choice"] == {"type": "image_generation"}
    assert "store" not in sent and "previous_response_id" not in sent


def test_file_ids_go_as_input_image(emu) -> None:
    reply = agent(emu).ask_sync("Edit this", ImageInput(file_id="file-abc123", detail="high"))
    content = responses(emu)[-1].json["input"][0]["content"]
    assert content[1] == {"type": "input_image", "file_id": "file-abc123", "detail": "high"}
    assert reply.files[0].metadata["action"] == "edit"


def test_instructions_are_sent(emu) -> None:
    config = OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url=emu.openai_base_url)
    Agent("a", config=config, tools=[ImageGenerationTool()], instructions="You draw logos.").ask_sync("x")
    assert responses(emu)[-1].json["instructions"] == "You draw logos."


def test_pil_images_bytes_and_results_are_accepted_as_inputs(emu, tmp_path: Path) -> None:
    first = agent(emu).ask_sync("A robot").files[0]
    path = tmp_path / "robot.png"
    path.write_bytes(first.data)
    for source in (first, first.data, first.to_pil(), path):
        assert agent(emu).ask_sync("Add a hat", source).files[0].metadata["action"] == "edit"


# --- multi-turn editing ----------------------------------------------------------------------

def test_multi_turn_with_store_uses_previous_response_id(emu) -> None:
    first = agent(emu).ask_sync("A robot")
    second = first.ask_sync("Put a party hat on the robot")
    sent = responses(emu)[-1].json
    assert sent["previous_response_id"] == first.response_id
    assert [part["type"] for part in sent["input"][0]["content"]] == ["input_text"]  # no image re-sent
    assert second.files[0].metadata["action"] == "edit"
    third = second.ask_sync("Now make it blue")
    assert responses(emu)[-1].json["previous_response_id"] == second.response_id
    assert third.files[0].data != second.files[0].data


def test_multi_turn_without_store_sends_the_image_back(emu) -> None:
    first = agent(emu, store=False).ask_sync("A robot")
    second = first.ask_sync("Put a party hat on the robot")
    sent = responses(emu)[-1].json
    assert sent["store"] is False and "previous_response_id" not in sent
    last_user = sent["input"][-1]["content"]
    assert [p["type"] for p in last_user] == ["input_image", "input_text"]
    assert second.files[0].metadata["action"] == "edit"
    assert sent["input"][0]["content"][0]["text"] == "A robot"  # the earlier turn travels too
    # The emulator enforces what the real API does: an unstored response cannot be referenced.
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=emu.openai_base_url, api_key=KEY, max_retries=0)
    with pytest.raises(BadRequestError, match="not found"):
        client.responses.create(model="gpt-4.1", input="again", previous_response_id=first.response_id)


# --- streaming -------------------------------------------------------------------------------

async def test_stream_delivers_every_partial_then_the_image_then_the_reply(emu) -> None:
    events = [event async for event in agent(emu, partial_images=3).stream("A lighthouse at dusk")]
    partials = [e for e in events if isinstance(e, PartialImageEvent)]
    assert [p.index for p in partials] == [0, 1, 2]
    assert all(p.image.metadata["partial"] and p.image.media_type == "image/png" for p in partials)
    images = [e for e in events if isinstance(e, ImageEvent)]
    assert len(images) == 1 and not images[0].image.metadata.get("partial")
    text = "".join(e.text for e in events if isinstance(e, TextDeltaEvent))
    assert isinstance(events[-1], ReplyEvent)
    reply = events[-1].reply
    # The reply's image is the streamed one, priced once the usage arrived (the last event).
    [priced] = reply.files
    assert priced.data == images[0].image.data and reply.body == text
    assert dict(priced.metadata) == {**images[0].image.metadata, "cost_usd": reply.cost.usd, "cost_simulated": True}
    assert responses(emu)[-1].json["stream"] is True


def test_ask_with_partial_images_streams_and_returns_the_final_image(emu) -> None:
    reply = agent(emu, partial_images=2).ask_sync("A lighthouse")
    assert len(reply.files) == 1 and responses(emu)[-1].json["stream"] is True


# --- errors ----------------------------------------------------------------------------------

def test_moderation_blocked_image_call_raises(emu) -> None:
    emu.inject("image_moderation")
    with pytest.raises(ContentPolicyError, match="safety system") as info:
        agent(emu).ask_sync("Something")
    assert info.value.reason == "moderation_blocked"


def test_moderation_http_400_raises_content_policy_error(emu) -> None:
    emu.inject("moderation")
    with pytest.raises(ContentPolicyError) as info:
        agent(emu).ask_sync("Something")
    assert info.value.status == 400 and info.value.reason == "moderation_blocked" and info.value.request_id


def test_failed_image_call_raises_and_keeps_the_images_made(emu) -> None:
    emu.inject("image_failed")
    with pytest.raises(ProviderError, match="Image generation failed") as info:
        agent(emu).ask_sync("Two posters [images:2]")
    assert not isinstance(info.value, ContentPolicyError)
    assert len(info.value.files) == 1 and info.value.files[0].media_type == "image/png"


async def test_failed_call_in_a_stream_raises_after_the_images_made(emu) -> None:
    emu.inject("image_failed")
    seen = []
    with pytest.raises(ProviderError) as info:
        async for event in agent(emu).stream("Two posters [images:2]"):
            seen.append(event)
    assert [type(e) for e in seen if isinstance(e, ImageEvent)] == [ImageEvent]
    assert info.value.files == [e.image for e in seen if isinstance(e, ImageEvent)]


def test_undecodable_image_is_a_provider_error(emu) -> None:
    emu.inject("undecodable")
    with pytest.raises(ProviderError, match="not a PNG, JPEG, WebP or GIF") as info:
        agent(emu).ask_sync("A cat")
    assert info.value.code == "undecodable_image"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 500, 503])
def test_http_errors_carry_status_message_and_request_id(emu, status: int) -> None:
    emu.inject("http", status=status, message=f"Emulated failure {status}")
    with pytest.raises(ProviderError) as info:
        agent(emu).ask_sync("A cat")
    error = info.value
    assert error.status == status and f"Emulated failure {status}" in str(error)
    assert error.request_id and error.request_id in str(error)


def test_secrets_in_provider_messages_are_masked(emu) -> None:
    emu.inject("http", status=401, message=f"Incorrect API key provided: {KEY}.")
    with pytest.raises(ProviderError) as info:
        agent(emu).ask_sync("A cat")
    assert KEY not in str(info.value) and KEY not in repr(info.value) and KEY not in info.value.message


def test_429_and_5xx_are_retried(emu) -> None:
    emu.inject("http", status=429, retry_after=0.01, times=2)
    reply = agent(emu, max_retries=2).ask_sync("A cat")
    assert len(reply.files) == 1 and len(responses(emu)) == 3
    emu.reset()
    emu.inject("http", status=503, retry_after=0.01, times=5)
    with pytest.raises(ProviderError) as info:
        agent(emu, max_retries=1).ask_sync("A cat")
    assert info.value.status == 503 and len(responses(emu)) == 2


def test_broken_stream_is_an_error_not_an_empty_success(emu) -> None:
    emu.inject("broken_stream")
    with pytest.raises(ProviderError):
        agent(emu, partial_images=1).ask_sync("A cat")


def test_error_event_in_a_stream_is_an_error(emu) -> None:
    emu.inject("stream_error")
    with pytest.raises(ProviderError):
        agent(emu, partial_images=1).ask_sync("A cat")


def test_bad_input_fails_before_any_request(emu, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        agent(emu).ask_sync("Edit", ImageInput(path=tmp_path / "nope.png"))
    with pytest.raises(ConfigError):
        agent(emu, partial_images=7).ask_sync("x")
    no_key = Agent("a", config=OpenAIResponsesConfig(model="gpt-4.1", base_url=emu.openai_base_url),
                   tools=[ImageGenerationTool()])
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        no_key.ask_sync("x")
    assert emu.requests == []


def test_connection_refused_is_a_provider_error() -> None:
    config = OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url="http://127.0.0.1:9/v1", max_retries=0)
    with pytest.raises(ProviderError, match="Could not reach the API"):
        Agent("a", config=config, tools=[ImageGenerationTool()]).ask_sync("x")


# --- cancellation, event loops ---------------------------------------------------------------

async def test_cancelling_ask_aborts_the_http_request(emu) -> None:
    emu.latency = 10
    task = asyncio.create_task(agent(emu).ask("A slow cat"))
    await _wait_for(lambda: len(emu.requests) == 1)  # the request is in flight (the first call imports the SDK)
    started = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - started < 1
    await _wait_for(lambda: emu.aborted == 1)


async def test_leaving_a_stream_early_closes_the_http_stream(emu) -> None:
    emu.stream_delay = 0.3  # frames arrive slowly: the stream would run for seconds if left open
    async for event in agent(emu, partial_images=3).stream("A lighthouse"):
        if isinstance(event, PartialImageEvent):
            break
    await _wait_for(lambda: emu.aborted == 1, timeout=1.0)


def test_ctrl_c_in_ask_sync_cancels_the_request(emu, ctrl_c_when_in_flight) -> None:
    emu.latency = 10
    pressed = ctrl_c_when_in_flight()
    with pytest.raises(KeyboardInterrupt):
        agent(emu).ask_sync("A slow cat")
    assert time.perf_counter() - pressed[0] < 1  # at once, not after the 10 s answer
    deadline = time.time() + 3
    while emu.aborted != 1 and time.time() < deadline:
        time.sleep(0.02)
    assert emu.aborted == 1
    emu.latency = 0
    assert agent(emu).ask_sync("Still usable").files  # nothing left broken


def test_one_agent_across_several_event_loops(emu) -> None:
    designer = agent(emu)
    first = asyncio.run(designer.ask("A robot"))
    second = asyncio.run(first.ask("With a hat"))
    third = designer.ask_sync("A cat")
    fourth = asyncio.run(designer.ask("A dog"))
    assert all(r.files for r in (first, second, third, fourth))


async def test_ask_sync_works_inside_a_running_loop(emu) -> None:
    reply = agent(emu).ask_sync("Inside a notebook")  # a running loop, like ipykernel's
    assert reply.files


# --- Azure OpenAI / Foundry ------------------------------------------------------------------

def test_azure_v1_surface_with_deployment_header(emu) -> None:
    config = AzureOpenAIResponsesConfig("gpt-4.1", api_key=KEY, azure_endpoint=emu.azure_endpoint,
                                        image_deployment="gpt-image-1")
    reply = Agent("az", config=config, tools=[ImageGenerationTool(quality="low")]).ask_sync("Microsoft logo")
    request = responses(emu)[-1]
    assert request.path == "/openai/v1/responses" and request.query == {"api-version": "preview"}
    assert request.headers["x-ms-oai-image-generation-deployment"] == "gpt-image-1"
    assert request.headers["api-key"] == "***"  # sent (masked in the emulator's log)
    assert reply.files[0].metadata["provider"] == "azure"


def test_azure_dated_api_version_and_environment(emu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", emu.azure_endpoint)
    monkeypatch.setenv("AZURE_OPENAI_IMAGE_DEPLOYMENT", "img-deploy")
    config = AzureOpenAIResponsesConfig("gpt-4.1", api_version="2025-04-01-preview")
    reply = Agent("az", config=config, tools=[ImageGenerationTool()]).ask_sync("A lake", )
    request = responses(emu)[-1]
    assert request.path == "/openai/responses" and request.query == {"api-version": "2025-04-01-preview"}
    assert request.headers["x-ms-oai-image-generation-deployment"] == "img-deploy"
    assert reply.files


def test_azure_streaming_partials(emu) -> None:
    config = AzureOpenAIResponsesConfig("gpt-4.1", api_key=KEY, base_url=emu.azure_endpoint + "/openai/v1/",
                                        image_deployment="gpt-image-1")
    az = Agent("az", config=config, tools=[ImageGenerationTool(partial_images=2)])

    async def run() -> list:
        return [e async for e in az.stream("A sunset over a mountain lake")]

    events = asyncio.run(run())
    assert sum(isinstance(e, PartialImageEvent) for e in events) == 2
    assert events[-1].reply.files


# --- Chat Completions ------------------------------------------------------------------------

def test_chat_completions_answers_text(emu) -> None:
    config = OpenAIConfig(model="gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, max_retries=0)
    chat = Agent("chat", config=config, instructions="Be brief.")
    reply = chat.ask_sync("Describe this image", BinaryResult(_png(8, 8)))
    assert reply.body and reply.files == []
    follow_up = reply.ask_sync("And in one word?")
    sent = [r for r in emu.requests if r.path.endswith("/chat/completions")][-1].json
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert follow_up.body


# --- helpers ---------------------------------------------------------------------------------

def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


async def _wait_for(condition, timeout: float = 3.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
