"""The OpenAI Images API provider through the real ``openai`` SDK, over HTTP, against the emulator.

The per-model rules are tested twice from one table: nbimagine refuses the request before sending
it, and the emulator (reached with the raw SDK, around our checks) refuses it the way the API does.
"""

from __future__ import annotations

import io
import warnings

import openai
import pytest
from PIL import Image

from nbimagine import Agent
from nbimagine.config import AzureOpenAIImagesConfig, OpenAIImagesConfig
from nbimagine.errors import (
    ConfigError,
    ContentPolicyError,
    InputError,
    InputWarning,
    ProviderError,
    UnsupportedToolError,
)
from nbimagine.events import ImageEvent, ImageInput, PartialImageEvent, ReplyEvent
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"


def images_agent(emu, **params: object) -> Agent:
    params.setdefault("max_retries", 0)
    return Agent("images", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, **params))


def image_calls(emu) -> list:
    return [r for r in emu.requests if "/images/" in r.path]


def png(width: int = 64, height: int = 64, mode: str = "RGB", colour: object = (40, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), colour).save(out, "PNG")
    return out.getvalue()


def raw_client(emu) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=emu.openai_base_url, max_retries=0)


# --- generations -----------------------------------------------------------------------------------

def test_n_images_come_from_one_call_with_their_metadata_and_usage(emu) -> None:
    reply = images_agent(emu, n=4, size="1536x1024", quality="low").ask_sync("A lighthouse at dusk")
    assert len(image_calls(emu)) == 1
    sent = image_calls(emu)[0]
    assert sent.path == "/v1/images/generations"
    assert sent.json == {"prompt": "A lighthouse at dusk", "model": "gpt-image-2", "n": 4, "size": "1536x1024",
                         "quality": "low"}
    assert len(reply.files) == 4 and len({f.sha256 for f in reply.files}) == 4  # real variants differ
    for index, image in enumerate(reply.files):
        meta = image.metadata
        assert (meta["width"], meta["height"]) == (1536, 1024)
        assert meta["index"] == index and meta["api"] == "images" and meta["action"] == "generate"
        assert (meta["provider"], meta["model"], meta["quality"], meta["size"]) == (
            "openai", "gpt-image-2", "low", "1536x1024")
        assert meta["media_type"] == "image/png" and isinstance(meta["created"], int)
    assert reply.usage.raw["output_tokens_details"]["image_tokens"] == reply.usage.output_image_tokens > 0
    assert reply.usage.images == 4 and reply.cost is not None
    assert reply.finish_reason == "completed"


@pytest.mark.parametrize(("fmt", "magic"), [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_output_format_and_compression(emu, fmt: str, magic: bytes) -> None:
    params = {"output_compression": 40} if fmt != "png" else {}
    reply = images_agent(emu, output_format=fmt, **params).ask_sync("A fox")
    assert reply.files[0].data.startswith(magic)
    assert reply.files[0].metadata["output_format"] == fmt


def test_transparent_background(emu) -> None:
    reply = images_agent(emu, background="transparent", output_format="png").ask_sync("A sticker")
    assert reply.files[0].to_pil().mode == "RGBA"
    assert reply.files[0].metadata["background"] == "transparent"


async def test_stream_yields_partials_then_each_image_then_the_reply(emu) -> None:
    agent = images_agent(emu, n=2, partial_images=2)
    events = [event async for event in agent.stream("A kite")]
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["PartialImageEvent", "PartialImageEvent", "ImageEvent"] * 2 + ["ReplyEvent"]
    partials = [e for e in events if isinstance(e, PartialImageEvent)]
    assert [p.index for p in partials] == [0, 1, 2, 3]
    assert all(p.image.metadata["partial"] for p in partials)
    reply = events[-1].reply
    # The reply's images are the streamed ones, each priced (cost_usd) once the last usage arrived.
    streamed = [e.image for e in events if isinstance(e, ImageEvent)]
    assert [f.data for f in streamed] == [f.data for f in reply.files]
    assert all(dict(f.metadata) == {**s.metadata, "cost_usd": reply.cost.usd / 2, "cost_simulated": True}
               for s, f in zip(streamed, reply.files, strict=True))
    assert reply.usage.input_tokens > 0 and reply.files[0].metadata["usage"]["output_tokens"] > 0
    assert image_calls(emu)[0].json["stream"] is True


def test_ask_with_partial_images_streams_and_returns_the_images(emu) -> None:
    reply = images_agent(emu, partial_images=1).ask_sync("A kite")
    assert len(reply.files) == 1 and image_calls(emu)[0].json["stream"] is True


def test_legacy_models_are_asked_for_base64(emu) -> None:
    reply = images_agent(emu, model="dall-e-3", size="1792x1024", quality="hd", style="natural").ask_sync("x")
    assert image_calls(emu)[0].json["response_format"] == "b64_json"
    assert reply.files[0].width == 1792


# --- edits -----------------------------------------------------------------------------------------

def test_an_edit_sends_every_image_as_multipart_in_one_call(emu) -> None:
    first, ref1, ref2 = png(512, 512), png(64, 64, colour="red"), ImageInput(data=png(32, 32, colour="blue"))
    reply = images_agent(emu, n=2, input_fidelity=None).ask_sync("Put the logo on the mug", first,
                                                                 refs=[ref1, ref2])
    sent = image_calls(emu)
    assert len(sent) == 1 and sent[0].path == "/v1/images/edits"
    assert sent[0].headers["content-type"].startswith("multipart/form-data")
    assert [f["media_type"] for f in sent[0].json["files"]["image[]"]] == ["image/png"] * 3
    assert sent[0].json["n"] == "2"  # multipart: numbers travel as text
    assert [f.metadata["action"] for f in reply.files] == ["edit", "edit"]
    assert reply.files[0].width == 512  # size auto keeps the input's shape


def test_one_image_goes_as_the_image_field(emu) -> None:
    images_agent(emu).ask_sync("Make it pink", png())
    assert list(image_calls(emu)[0].json["files"]) == ["image"]


def test_a_follow_up_edits_the_first_image_of_the_reply(emu) -> None:
    first = images_agent(emu, n=2).ask_sync("A robot")
    again = first.ask_sync("Now give it a hat")
    sent = image_calls(emu)[-1]
    assert sent.path.endswith("/images/edits") and sent.json["files"]["image"][0]["bytes"] == len(first.files[0].data)
    assert again.files[0].metadata["action"] == "edit"


def test_instructions_lead_the_prompt(emu) -> None:
    config = OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url)
    Agent("a", config=config, instructions="Flat vector style.").ask_sync("A cat")
    assert image_calls(emu)[0].json["prompt"] == "Flat vector style.\n\nA cat"


# --- what is checked before any request ------------------------------------------------------------

# (model, parameters, the parameter the API names in its 400)
REFUSED = [
    ("gpt-image-2", {"n": 11}, "n"),
    ("gpt-image-2", {"n": 0}, "n"),
    ("dall-e-3", {"n": 2}, "n"),
    ("gpt-image-2", {"size": "1000x1000"}, "size"),
    ("gpt-image-2", {"size": "3840x3840"}, "size"),
    ("gpt-image-2", {"size": "3200x1024"}, "size"),
    ("gpt-image-1", {"size": "2048x1152"}, "size"),
    ("dall-e-2", {"size": "1536x1024"}, "size"),
    ("dall-e-3", {"size": "auto"}, "size"),
    ("gpt-image-2", {"quality": "xhigh"}, "quality"),
    ("gpt-image-2", {"quality": "hd"}, "quality"),
    ("dall-e-3", {"quality": "high"}, "quality"),
    ("gpt-image-2", {"style": "vivid"}, "style"),
    ("dall-e-2", {"output_format": "png"}, "output_format"),
    ("dall-e-2", {"background": "transparent"}, "background"),
    ("gpt-image-2", {"background": "transparent", "output_format": "jpeg"}, "background"),
    ("gpt-image-2", {"moderation": "high"}, "moderation"),
    ("gpt-image-2", {"output_compression": 101, "output_format": "jpeg"}, "output_compression"),
    ("gpt-image-2", {"partial_images": 4}, "partial_images"),
    ("gpt-image-1-mini", {"input_fidelity": "high"}, "input_fidelity"),
]


@pytest.mark.parametrize(("model", "params", "param"), REFUSED, ids=[f"{m}-{p}" for m, p, _ in REFUSED])
def test_nbimagine_and_the_emulator_refuse_the_same_requests(emu, model: str, params: dict, param: str) -> None:
    with pytest.raises(ConfigError):
        OpenAIImagesConfig(model, **params)
    # The same request sent around our checks: the emulator answers as the API does.
    client = raw_client(emu)
    with pytest.raises(openai.BadRequestError) as caught:
        if param == "input_fidelity":
            client.images.edit(model=model, prompt="x", image=("a.png", png(), "image/png"), **params)
        else:
            client.images.generate(model=model, prompt="x", **params)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and caught.value.body["message"]


ACCEPTED = [
    ("gpt-image-2", {"size": "512x288", "quality": "high", "n": 10}),
    ("gpt-image-2", {"size": "3840x2160"}),
    ("gpt-image-2.5-flare", {"quality": "max"}),
    ("gpt-image-1", {"size": "1024x1536", "quality": "low", "moderation": "low"}),
    ("dall-e-2", {"size": "256x256", "n": 3}),
    ("dall-e-3", {"size": "1024x1792", "quality": "hd", "style": "vivid"}),
    ("my-azure-deployment", {"size": "1536x864"}),
]


@pytest.mark.parametrize(("model", "params"), ACCEPTED, ids=[m for m, _ in ACCEPTED])
def test_what_the_api_accepts_is_sent(emu, model: str, params: dict) -> None:
    reply = images_agent(emu, model=model, **params).ask_sync("A tree")
    assert len(reply.files) == params.get("n", 1)
    if "size" in params:
        assert f"{reply.files[0].width}x{reply.files[0].height}" == params["size"]


def test_bad_inputs_fail_before_any_request(emu) -> None:
    agent = images_agent(emu)
    cases = [
        (lambda: agent.ask_sync("x", *[png()] * 17), "at most 16"),
        # A URL is fetched (and uploaded): one that cannot be fetched fails here, before the API is asked.
        (lambda: agent.ask_sync("x", ImageInput("http://127.0.0.1:9/a.png")), "Cannot fetch"),
        (lambda: agent.ask_sync("x", ImageInput(file_id="file-1")), "must be bytes"),
        (lambda: agent.ask_sync(png()), "needs a text prompt"),
        (lambda: agent.ask_sync("x" * 32001), "32,000"),
        (lambda: images_agent(emu, model="dall-e-2").ask_sync("x", png(64, 32)), "square"),
        (lambda: images_agent(emu, model="dall-e-2").ask_sync("x", png(), png()), "at most 1"),
        (lambda: images_agent(emu, model="dall-e-3").ask_sync("x", png()), "cannot edit"),
    ]
    for call, words in cases:
        with pytest.raises((InputError, ConfigError), match=words):
            call()
    assert image_calls(emu) == []


def test_a_type_the_model_does_not_take_is_sent_as_png_and_said(emu) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(jpeg, "JPEG")
    webp = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(webp, "WEBP")
    with pytest.warns(InputWarning, match="reference image 2 was image/gif.*sent as PNG"):
        images_agent(emu).ask_sync("x", png(), jpeg.getvalue(), _gif(), webp.getvalue())
    sent = image_calls(emu)[-1].json["files"]["image[]"]
    assert [f["media_type"] for f in sent] == ["image/png", "image/jpeg", "image/png", "image/webp"]
    with pytest.warns(InputWarning, match="the image to edit was image/jpeg, which dall-e-2 edits do not take"):
        images_agent(emu, model="dall-e-2").ask_sync("x", jpeg.getvalue())
    assert image_calls(emu)[-1].json["files"]["image"] == [
        {"media_type": "image/png", "bytes": image_calls(emu)[-1].json["files"]["image"][0]["bytes"]}]


def test_the_emulator_refuses_too_many_images_and_bad_files(emu) -> None:
    client = raw_client(emu)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-2", prompt="x", image=[("a.png", png(), "image/png")] * 17)
    assert caught.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-2", prompt="x", image=("a.gif", _gif().data, "image/gif"))
    assert caught.value.body["code"] == "invalid_image_format"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-2", prompt="")
    assert caught.value.body["code"] == "missing_required_parameter"


def test_values_without_effect_are_warned_and_not_sent(emu) -> None:
    with pytest.warns(InputWarning, match="output_compression"):
        images_agent(emu, output_compression=50).ask_sync("x")
    assert "output_compression" not in image_calls(emu)[-1].json
    with pytest.warns(InputWarning, match="input_fidelity"):
        images_agent(emu, input_fidelity="high").ask_sync("x", png())
    assert "input_fidelity" not in image_calls(emu)[-1].json
    with pytest.warns(InputWarning, match="moderation applies to generations only"):
        images_agent(emu, moderation="low").ask_sync("x", png())
    assert "moderation" not in image_calls(emu)[-1].json
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images_agent(emu, model="gpt-image-1", input_fidelity="high").ask_sync("x", png())
    assert image_calls(emu)[-1].json["input_fidelity"] == "high"


def test_tools_are_refused() -> None:
    with pytest.raises(UnsupportedToolError, match="set size, quality"):
        Agent("a", config=OpenAIImagesConfig(), tools=[ImageGenerationTool()])


def test_config_defaults_and_repr() -> None:
    config = OpenAIImagesConfig(n=2, api_key="sk-secret-value-123")
    assert config.model == "gpt-image-2" and config.params() == {"n": 2}
    assert "secret" not in repr(config) and "n=2" in repr(config)
    assert OpenAIImagesConfig(output_format="jpg").output_format == "jpeg"


# --- failures --------------------------------------------------------------------------------------

def test_moderation_is_a_content_policy_error(emu) -> None:
    with pytest.raises(ContentPolicyError) as caught:
        images_agent(emu).ask_sync("[fault:moderation] x")
    assert caught.value.status == 400 and caught.value.reason == "moderation_blocked"


def test_http_errors_and_broken_streams_are_provider_errors(emu) -> None:
    with pytest.raises(ProviderError) as caught:
        images_agent(emu).ask_sync("[error:500] x")
    assert caught.value.status == 500 and caught.value.request_id
    with pytest.raises(ProviderError):
        images_agent(emu, partial_images=1).ask_sync("[fault:broken_stream] x")


# --- Azure -----------------------------------------------------------------------------------------

def test_azure_uses_the_deployment_route(emu) -> None:
    config = AzureOpenAIImagesConfig("image-deploy", api_key=KEY, azure_endpoint=emu.azure_endpoint, n=2,
                                     max_retries=0)
    reply = Agent("a", config=config).ask_sync("A lake")
    sent = image_calls(emu)[0]
    assert sent.path == "/openai/deployments/image-deploy/images/generations"
    assert sent.query == {"api-version": "2025-04-01-preview"} and sent.headers["api-key"] == "***"
    assert len(reply.files) == 2 and reply.files[0].metadata["provider"] == "azure"
    Agent("a", config=config).ask_sync("Edit", png())
    assert image_calls(emu)[1].path == "/openai/deployments/image-deploy/images/edits"


def test_azure_needs_credentials_and_endpoint() -> None:
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        Agent("a", config=AzureOpenAIImagesConfig("d")).ask_sync("x")
    with pytest.raises(ConfigError, match="AZURE_OPENAI_ENDPOINT"):
        Agent("a", config=AzureOpenAIImagesConfig("d", api_key="k" * 10)).ask_sync("x")


def _gif() -> ImageInput:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, "GIF")
    return ImageInput(data=out.getvalue())


def test_reply_event_is_last(emu) -> None:
    async def run() -> list:
        return [e async for e in images_agent(emu).stream("x")]

    import asyncio

    events = asyncio.run(run())
    assert isinstance(events[-1], ReplyEvent) and len(events[-1].reply.files) == 1
