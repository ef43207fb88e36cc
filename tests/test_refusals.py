"""Issue 10, kind 1: every "no image, because..." outcome is an error or a visible outcome, never a silent
empty success. Table-driven over google-genai's own enums (and a reason the SDK has never heard of) and over
the OpenAI Responses shapes that end without an image."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.genai import types
from google.oauth2.credentials import Credentials
from IPython.core.interactiveshell import InteractiveShell

from nbimagine import Agent
from nbimagine._providers.google import finish_outcome
from nbimagine.config import GeminiConfig, OpenAIResponsesConfig, VertexAIConfig
from nbimagine.emulator._gemini import _BLOCK_MESSAGES, _FINISH_MESSAGES
from nbimagine.errors import ContentPolicyError, ProviderError
from nbimagine.tools import ImageGenerationTool

FUTURE_REASON = "IMAGE_SOMETHING_NEW"  # a reason added to the API after this SDK release


def gemini(emu: Any, vertex: bool) -> GeminiConfig:
    if vertex:
        return VertexAIConfig(model="gemini-2.5-flash-image", base_url=emu.vertex_base_url, project="p",
                              location="us-central1", credentials=Credentials(token="t"), max_retries=0)
    return GeminiConfig(model="gemini-3.1-flash-image", api_key="AIzaTestKey-0123456789", max_retries=0,
                        base_url=emu.gemini_base_url)


def run(agent: Agent, prompt: str, stream: bool) -> Any:
    if not stream:
        return agent.ask_sync(prompt)

    async def go() -> Any:
        return [event async for event in agent.stream(prompt)][-1].reply

    return asyncio.run(go())


def expected_message(reason: str) -> str:
    return _FINISH_MESSAGES.get(reason, f"The candidate stopped with finish reason {reason} (emulated).")


FINISH_REASONS = [r.value for r in types.FinishReason] + [FUTURE_REASON]


@pytest.mark.parametrize("reason", FINISH_REASONS)
@pytest.mark.parametrize(("vertex", "stream"), [(False, False), (False, True), (True, True)])
@pytest.mark.filterwarnings("ignore:IMAGE_SOMETHING_NEW is not a valid FinishReason")
def test_every_finish_reason_is_an_error_or_a_visible_outcome(emu: Any, reason: str, vertex: bool,
                                                              stream: bool) -> None:
    emu.inject(f"finish:{reason}")
    agent = Agent("a", config=gemini(emu, vertex))
    outcome = finish_outcome(reason)
    if outcome in ("policy", "failure"):
        with pytest.raises(ProviderError) as info:
            run(agent, "a fox", stream)
        error = info.value
        assert isinstance(error, ContentPolicyError) == (outcome == "policy")
        assert reason in str(error) and error.code == reason
        assert expected_message(reason) in str(error)  # Google's finishMessage is carried into the error
        return
    reply = run(agent, "a fox", stream)
    assert reply.finish_reason == reason
    if outcome == "success":
        assert reply.files and reply.finish_message is None
    elif reply.files:  # MAX_TOKENS after the image: the image is kept, the reason shown
        assert reply.files[0].metadata["finish_reason"] == reason
    else:
        assert reply.finish_message == expected_message(reason)


def test_the_classification_covers_the_sdk_enum() -> None:
    outcomes = {r.value: finish_outcome(r.value) for r in types.FinishReason}
    assert [r for r, o in outcomes.items() if o == "success"] == ["STOP"]
    assert {r for r, o in outcomes.items() if o == "no_image"} == {"NO_IMAGE", "MAX_TOKENS"}
    assert {"IMAGE_SAFETY", "MODEL_ARMOR", "IMAGE_PROHIBITED_CONTENT", "SPII"} <= {
        r for r, o in outcomes.items() if o == "policy"}
    assert {"IMAGE_OTHER", "OTHER", "FINISH_REASON_UNSPECIFIED", "MALFORMED_RESPONSE"} <= {
        r for r, o in outcomes.items() if o == "failure"}
    assert finish_outcome(FUTURE_REASON) == "failure" and finish_outcome("IMAGE_SAFETY_V2") == "policy"


@pytest.mark.parametrize("reason", [r.value for r in types.BlockedReason] + ["NEW_BLOCK_REASON"])
@pytest.mark.parametrize("vertex", [False, True])
@pytest.mark.filterwarnings("ignore:NEW_BLOCK_REASON is not a valid BlockedReason")
def test_every_prompt_block_reason_is_a_policy_error(emu: Any, reason: str, vertex: bool) -> None:
    emu.inject(f"prompt_blocked:{reason}")
    with pytest.raises(ContentPolicyError) as info:
        Agent("a", config=gemini(emu, vertex)).ask_sync("a fox")
    assert info.value.reason == reason and "prompt" in str(info.value)
    assert _BLOCK_MESSAGES.get(reason, f"The prompt was blocked ({reason}).") in str(info.value)


@pytest.mark.parametrize("stream", [False, True])
def test_recorded_vertex_model_armor_is_a_policy_error_with_its_message(emu: Any, stream: bool) -> None:
    with pytest.raises(ContentPolicyError) as info:
        run(Agent("a", config=gemini(emu, vertex=True)), "a fox [fault:model_armor]", stream)
    assert info.value.reason == "MODEL_ARMOR" and "Model Armor" in str(info.value)


def test_image_other_is_an_error_not_an_empty_success(emu: Any) -> None:
    for stream in (False, True):
        emu.inject("image_other")
        with pytest.raises(ProviderError, match=r"IMAGE_OTHER.*could not generate the image"):
            run(Agent("a", config=gemini(emu, vertex=False)), "a fox", stream)


# --- OpenAI Responses -----------------------------------------------------------------------------------

KEY = "sk-emulator-test-key-0123456789"


def openai_agent(emu: Any) -> Agent:
    return Agent("a", config=OpenAIResponsesConfig(model="gpt-5", api_key=KEY, base_url=emu.openai_base_url,
                                                   max_retries=0),
                 tools=[ImageGenerationTool(size="1024x1024", quality="low")])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "error", "fragment"), [
    ("refusal", ContentPolicyError, "I'm sorry"),
    ("incomplete:content_filter", ContentPolicyError, "content filter"),
    ("stream_error", ProviderError, "server_error"),
    ("stream_error_nested", ProviderError, "had an error"),
    ("image_failed", ProviderError, "internal error"),
    ("image_moderation", ContentPolicyError, "safety system"),
])
def test_openai_outcomes_without_an_image_raise(emu: Any, stream: bool, fault: str, error: type,
                                               fragment: str) -> None:
    emu.inject(fault)
    with pytest.raises(error, match=fragment) as info:
        run(openai_agent(emu), "a fox", stream)
    assert info.value.provider == "openai"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("azure", [False, True])
def test_an_images_api_answer_without_an_image_is_an_error(emu: Any, stream: bool, azure: bool) -> None:
    """data: [] (or empty completed events) with HTTP 200 was a reply with files=[] and no error."""
    from nbimagine.config import AzureOpenAIImagesConfig, OpenAIImagesConfig

    config: Any = (AzureOpenAIImagesConfig("gpt-image-1", api_key=KEY, azure_endpoint=emu.azure_endpoint,
                                           max_retries=0) if azure
                   else OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0))
    emu.inject("empty_data")
    with pytest.raises(ProviderError, match="without any image") as info:
        run(Agent("a", config=config), "a fox", stream)
    assert info.value.code == "no_image" and info.value.provider == ("azure" if azure else "openai")


@pytest.mark.parametrize("stream", [False, True])
def test_openai_incomplete_without_an_image_is_a_visible_outcome(emu: Any, stream: bool) -> None:
    emu.inject("incomplete")
    reply = run(openai_agent(emu), "a fox", stream)
    assert reply.files == [] and reply.finish_reason == "incomplete: max_output_tokens"
    assert "before any image" in reply.finish_message


@pytest.mark.parametrize("stream", [False, True])
def test_openai_production_shapes_keep_the_image(emu: Any, stream: bool) -> None:
    emu.inject("generating_result")  # status "generating" but the full result: the image is used
    assert run(openai_agent(emu), "a fox", stream).files
    emu.inject("mime_mismatch")  # output_format says png, the bytes are JPEG: metadata follows the bytes
    image = run(openai_agent(emu), "a fox", stream).files[0]
    assert image.media_type == "image/jpeg" and image.metadata["output_format"] == "png"
    emu.inject("no_completed")  # no response.completed: an error that carries the finished image
    if stream:
        with pytest.raises(ProviderError) as info:
            run(openai_agent(emu), "a fox", stream)
        assert len(info.value.files) == 1
    else:
        assert run(openai_agent(emu), "a fox", stream).finish_reason == "in_progress"


# --- the notebook shows a non-error outcome with its reason and message ----------------------------------


def test_notebook_shows_no_image_with_reason_and_message(emu: Any, tmp_path: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.testing.globalipapp import get_ipython  # noqa: F401  (a display publisher that records)

    from nbimagine._session import get_session, set_emulator

    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    if "imagine" not in shell.magics_manager.magics["cell"]:
        shell.run_line_magic("load_ext", "nbimagine")
    shown: list[dict[str, Any]] = []
    monkeypatch.setattr(shell.display_pub, "publish", lambda data, **kw: shown.append(data))
    monkeypatch.setattr(shell.display_pub, "update_display", lambda data, **kw: shown.append(data), raising=False)
    session = get_session()
    set_emulator(emu)
    session.use(emulator=True)
    try:
        emu.inject("no_image")
        shell.run_cell_magic("imagine", "-p gemini --no-history", "a fox")
    finally:
        session.use(emulator=False)
        set_emulator(None)
    text = "\n".join(data.get("text/plain", "") for data in shown)
    assert "No image (NO_IMAGE)" in text and _FINISH_MESSAGES["NO_IMAGE"] in text
    assert "text only" not in text  # the reason is the provider's, not a model that chose to answer in words
