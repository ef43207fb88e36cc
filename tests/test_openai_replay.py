"""Replay real recorded OpenAI traffic (pydantic-ai cassettes) through the real SDK and our parser."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from replay import ReplayServer

from nbimagine import Agent
from nbimagine.config import OpenAIResponsesConfig
from nbimagine.tools import ImageGenerationTool

CASSETTES = Path(__file__).parent / "cassettes"


def _agent(server: ReplayServer, **tool: object) -> Agent:
    config = OpenAIResponsesConfig(model="gpt-5", api_key="sk-test", base_url=server.url + "/v1", max_retries=0)
    return Agent("replay", config=config, tools=[ImageGenerationTool(**tool)])


def test_jpeg_cassette_gives_a_jpeg_with_its_metadata() -> None:
    with ReplayServer(CASSETTES / "openai__test_openai_responses_image_generation_jpeg.yaml") as server:
        reply = _agent(server, output_format="jpeg").ask_sync("Generate an image of axolotl.")

    method, path, sent = server.requests[0]
    assert (method, path) == ("POST", "/v1/responses")
    # Only what the user set is sent: output_format, and nothing the API would default.
    assert sent["tools"] == [{"type": "image_generation", "output_format": "jpeg"}]

    assert reply.body == ""
    assert reply.finish_reason == "completed"
    assert reply.response_id.startswith("resp_08acbdf1")
    assert reply.usage.raw["total_tokens"] == 3323 == reply.usage.input_tokens + 1434
    [image] = reply.files
    assert image.media_type == "image/jpeg"
    assert image.data[:3] == b"\xff\xd8\xff"
    assert (image.width, image.height) == (1536, 1024)
    assert Image.open(io.BytesIO(image.data)).size == (1536, 1024)
    meta = image.metadata
    assert meta["provider"] == "openai"
    assert meta["model"] == "gpt-5-2025-08-07"
    assert meta["revised_prompt"].startswith("Photorealistic close-up of a pink leucistic axolotl")
    assert (meta["size"], meta["quality"], meta["background"], meta["output_format"]) == (
        "1536x1024", "high", "opaque", "jpeg")
    assert meta["call_id"].startswith("ig_08acbdf1")


def test_text_turn_then_png_turn() -> None:
    with ReplayServer(CASSETTES / "openai__test_openai_responses_image_or_text_output.yaml") as server:
        agent = _agent(server)
        story = agent.ask_sync("Tell me a two-sentence story about an axolotl.")
        picture = agent.ask_sync("Generate an image of an axolotl.")

    # The tool was offered but not used: text only, no files, not an error.
    assert story.files == []
    assert "axolotl" in story.body.lower() and len(story.body) > 40
    [image] = picture.files
    assert image.media_type == "image/png"
    assert (image.width, image.height) == (1536, 1024)  # the model picked landscape with size "auto"
    assert image.metadata["size"] == "1536x1024"
    assert image.metadata["revised_prompt"]
    assert len(image.data) > 2_000_000


def test_media_type_comes_from_bytes_not_from_the_request(tmp_path: Path) -> None:
    # The request asked for png, the recorded answer is JPEG: the label and the file follow the bytes.
    with ReplayServer(CASSETTES / "openai__test_openai_responses_image_generation_jpeg.yaml") as server:
        reply = _agent(server, output_format="png").ask_sync("Generate an image of axolotl.")
    image = reply.files[0]
    assert image.media_type == "image/jpeg"
    assert image.save(tmp_path / "axolotl.v2").name == "axolotl.v2.jpg"
    assert image.save(tmp_path).suffix == ".jpg"
    converted = image.save(tmp_path / "axolotl.png")  # an explicit .png gets PNG bytes, not mislabelled JPEG
    assert converted.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
