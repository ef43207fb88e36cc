"""Replay real recorded Gemini / Vertex AI traffic (pydantic-ai cassettes) through google-genai and our parser."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from google.genai import types
from google.oauth2.credentials import Credentials
from PIL import Image
from replay import ReplayServer, load_cassette

from nbimagine import Agent
from nbimagine.config import GeminiConfig, VertexAIConfig
from nbimagine.errors import ProviderError

CASSETTES = Path(__file__).parent / "cassettes"
GEMINI_TEXT = CASSETTES / "google__test_google_image_generation_with_text.yaml"
VERTEX_JPEG = CASSETTES / "google__test_google_vertexai_image_generation_with_output_format.yaml"
KEY = "AIzaReplayKey-0123456789"


def _recorded(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    [interaction] = load_cassette(path)
    return interaction["request"]["parsed_body"], interaction["response"]["parsed_body"]


def test_gemini_3_image_with_text_and_thought_signatures(emu: Any) -> None:
    sent_then, answer = _recorded(GEMINI_TEXT)
    recorded_parts = answer["candidates"][0]["content"]["parts"]
    config = GeminiConfig(model="gemini-3-pro-image-preview", api_key=KEY, api_version="v1beta",
                          response_modalities=["TEXT", "IMAGE"], max_retries=0)
    with ReplayServer(GEMINI_TEXT) as server:
        reply = Agent("replay", config=config.replace(base_url=server.url)).ask_sync(
            "Generate an illustrated two-sentence story about an axolotl.")

    [(method, path, sent)] = server.requests
    assert (method, path) == ("POST", "/v1beta/models/gemini-3-pro-image-preview:generateContent")
    assert sent == sent_then  # byte-for-byte the request pydantic-ai recorded

    assert reply.body == recorded_parts[0]["text"]
    assert reply.body.startswith("A little axolotl named Archie")
    assert reply.finish_reason == "STOP" and reply.response_id == "QV8oae6ZGKGnmtkPoanu6A0"
    assert reply.usage.reasoning_tokens == 174 and reply.usage.raw["totalTokenCount"] == 1471
    [image] = reply.files
    assert image.media_type == "image/jpeg" and image.data[:3] == b"\xff\xd8\xff"
    assert (image.width, image.height) == (1408, 768)
    assert Image.open(io.BytesIO(image.data)).size == (1408, 768)
    assert image.data == base64.b64decode(recorded_parts[1]["inlineData"]["data"])
    meta = image.metadata
    assert (meta["provider"], meta["model"], meta["finish_reason"]) == (
        "gemini", "gemini-3-pro-image-preview", "STOP")
    assert meta["response_id"] == reply.response_id

    # The model turn is kept whole: both parts with their real signatures.
    model_turn = reply._history[-1]
    assert model_turn.role == "model"
    kept = [base64.b64encode(p.thought_signature).decode() for p in model_turn.parts]
    assert kept == [p["thoughtSignature"] for p in recorded_parts]

    # ... and they reach the wire on the next turn (a Gemini 2.5 name: the emulator checks no signatures).
    follow = Agent("next", config=config.replace(model="gemini-2.5-flash-image", base_url=emu.gemini_base_url))
    follow.ask_sync("Now give it a sombrero.", _history=reply._history)
    contents = emu.requests[-1].json["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    text_part, image_part = contents[1]["parts"]
    for part, recorded in zip((text_part, image_part), recorded_parts, strict=True):
        signature = part.get("thoughtSignature") or part["thought_signature"]
        assert base64.urlsafe_b64decode(signature) == base64.b64decode(recorded["thoughtSignature"])
    assert base64.urlsafe_b64decode(image_part["inlineData"]["data"]) == image.data

    # A Gemini 3 emulator rejects these real signatures (they are not its own), which shows it checks them.
    with pytest.raises(ProviderError, match="Corrupted thought signature") as info:
        Agent("next", config=config.replace(base_url=emu.gemini_base_url)).ask_sync(
            "Now give it a sombrero.", _history=reply._history)
    assert info.value.status == 400


def test_vertex_jpeg_output_format() -> None:
    sent_then, answer = _recorded(VERTEX_JPEG)
    config = VertexAIConfig(
        model="gemini-2.5-flash-image", project="pydantic-ai", location="global",
        credentials=Credentials(token="fake-token"), response_modalities=["TEXT", "IMAGE"], max_retries=0,
        image_config=types.ImageConfig(output_mime_type="image/jpeg", output_compression_quality=85),
    )
    with ReplayServer(VERTEX_JPEG) as server:
        reply = Agent("replay", config=config.replace(base_url=server.url)).ask_sync(
            "Generate an image of an axolotl.")

    [(method, path, sent)] = server.requests
    assert (method, path) == ("POST", "/v1beta1/projects/pydantic-ai/locations/global/publishers/google/models/"
                                      "gemini-2.5-flash-image:generateContent")
    assert sent == sent_then

    assert reply.body == "" and reply.finish_reason == "STOP"  # image only, no text part
    assert reply.provider == "vertex" and reply.model == "gemini-2.5-flash-image"
    assert reply.response_id == answer["responseId"]
    assert reply.usage.raw["candidatesTokenCount"] == 1290 == reply.usage.output_image_tokens
    [image] = reply.files
    assert image.media_type == "image/jpeg" and (image.width, image.height) == (1024, 1024)
    assert image.metadata["provider"] == "vertex" and image.metadata["finish_reason"] == "STOP"
    assert Image.open(io.BytesIO(image.data)).format == "JPEG"
    # Gemini 2.5 gives no signatures; the model turn is still kept for the next turn.
    model_turn = reply._history[-1]
    assert model_turn.role == "model" and model_turn.parts[0].inline_data.data == image.data
