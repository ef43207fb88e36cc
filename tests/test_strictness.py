"""Issue 10, kinds 2 and 3: what the APIs reject is refused before the request (and by the emulator, the same
way); what they accept is never refused (a value without effect is a warning)."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
import warnings
from typing import Any

import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from nbimagine import Agent
from nbimagine._providers._inputs import GEMINI, OPENAI
from nbimagine.config import GeminiConfig, OpenAIResponsesConfig
from nbimagine.errors import ConfigError, InputError, InputWarning
from nbimagine.events import ImageInput
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"
GKEY = "AIzaTestKey-0123456789"


def image(fmt: str, *, frames: int = 1, size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    first = Image.new("RGB", size, "red")
    if frames > 1:
        first.save(out, fmt, save_all=True, append_images=[Image.new("RGB", size, "blue")] * (frames - 1))
    else:
        first.save(out, fmt)
    return out.getvalue()


INPUTS = {
    "png": image("PNG"), "jpeg": image("JPEG"), "webp": image("WEBP"), "gif": image("GIF"),
    "animated_gif": image("GIF", frames=3),
}


def openai_agent(emu: Any, **config: Any) -> Agent:
    return Agent("a", config=OpenAIResponsesConfig(model="gpt-5", api_key=KEY, base_url=emu.openai_base_url,
                                                   max_retries=0, **config),
                 tools=[ImageGenerationTool(size="1024x1024")])


def gemini_agent(emu: Any) -> Agent:
    return Agent("a", config=GeminiConfig(model="gemini-2.5-flash-image", api_key=GKEY, max_retries=0,
                                          base_url=emu.gemini_base_url))


# Every provider x every input type: accepted as is, converted without loss (and said so), or refused
# before any request, as the table in _providers/_inputs.py says.
EXPECTED = {
    ("openai", "png"): "sent", ("openai", "jpeg"): "sent", ("openai", "webp"): "sent", ("openai", "gif"): "sent",
    ("openai", "animated_gif"): "refused",
    ("gemini", "png"): "sent", ("gemini", "jpeg"): "sent", ("gemini", "webp"): "sent",
    ("gemini", "gif"): "converted", ("gemini", "animated_gif"): "refused",
}


@pytest.mark.parametrize(("provider", "kind"), list(EXPECTED))
def test_every_provider_and_input_type(emu: Any, provider: str, kind: str) -> None:
    agent = openai_agent(emu) if provider == "openai" else gemini_agent(emu)
    data = INPUTS[kind]
    expected = EXPECTED[(provider, kind)]
    if expected == "refused":
        with pytest.raises(InputError, match="animated GIF"):
            agent.ask_sync("edit it", ImageInput(data=data))
        assert not emu.requests
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reply = agent.ask_sync("edit it", ImageInput(data=data))
    assert reply.files
    converted = [w for w in caught if issubclass(w.category, InputWarning)]
    assert bool(converted) == (expected == "converted")
    sent = json.dumps(emu.requests[-1].json)
    if expected == "converted":  # the same pixels as PNG
        assert "image/png" in sent and "image/gif" not in sent and "GIF" in str(converted[0].message)


def _raw_gemini(emu: Any, mime: str, data: bytes) -> tuple[int, dict[str, Any]]:
    body = {"contents": [{"role": "user", "parts": [{"text": "edit"}, {"inlineData": {
        "mimeType": mime, "data": base64.b64encode(data).decode()}}]}]}
    request = urllib.request.Request(f"{emu.gemini_base_url}/v1beta/models/gemini-2.5-flash-image:generateContent",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "x-goog-api-key": GKEY})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_emulator_rejects_gif_for_gemini_like_the_live_api(emu: Any) -> None:
    status, body = _raw_gemini(emu, "image/gif", INPUTS["gif"])
    assert status == 400 and body["error"] == {"code": 400, "message": "Unsupported MIME type: image/gif",
                                               "status": "INVALID_ARGUMENT"}
    assert all(mime in GEMINI.media_types for mime in ("image/png", "image/jpeg", "image/webp"))
    assert _raw_gemini(emu, "image/png", INPUTS["png"])[0] == 200


@pytest.mark.parametrize("kind", ["png", "jpeg", "webp"])
def test_truncated_inputs_are_a_400_for_both_vendors(emu: Any, kind: str) -> None:
    data = INPUTS[kind] if kind != "jpeg" else image("JPEG", size=(256, 256))
    cut = data[: len(data) * 6 // 10]
    status, body = _raw_gemini(emu, f"image/{kind}", cut)
    assert status == 400 and "Unable to process input image" in body["error"]["message"]
    client = openai.OpenAI(base_url=emu.openai_base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", tools=[{"type": "image_generation"}], input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": f"data:image/{kind};base64,{base64.b64encode(cut).decode()}"}]}])
    assert info.value.code == "invalid_image_format"


def test_emulator_rejects_an_animated_gif_for_openai(emu: Any) -> None:
    client = openai.OpenAI(base_url=emu.openai_base_url, api_key=KEY, max_retries=0)
    url = "data:image/gif;base64," + base64.b64encode(INPUTS["animated_gif"]).decode()
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", tools=[{"type": "image_generation"}],
                                input=[{"role": "user", "content": [{"type": "input_image", "image_url": url}]}])
    assert info.value.code == "invalid_image_format" and OPENAI.animated_gif is False


def test_tool_choice_image_generation_needs_the_image_tool(emu: Any) -> None:
    with pytest.raises(ConfigError, match="tool_choice='image_generation'"):
        Agent("a", config=OpenAIResponsesConfig(model="gpt-5", api_key=KEY, tool_choice="image_generation"))
    # ... and the emulator answers what the live API answers when it is sent anyway.
    client = openai.OpenAI(base_url=emu.openai_base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="gpt-5", input="a cat", tool_choice={"type": "image_generation"})
    assert info.value.status_code == 400 and info.value.param == "tool_choice"
    assert info.value.message.endswith("Tool choice 'image_generation' not found in 'tools' parameter.")


def test_inline_limits_counted_with_history(emu: Any) -> None:
    big = ImageInput(data=b"\x89PNG\r\n\x1a\n" + bytes(16 * 1024 * 1024))
    with pytest.raises(InputError, match="at most 20 MB"):
        gemini_agent(emu).ask_sync("edit", big)
    assert not emu.requests


def test_emulator_answers_a_gemini_request_over_20_mb_with_400(emu: Any) -> None:
    client = genai.Client(api_key=GKEY, http_options=types.HttpOptions(base_url=emu.gemini_base_url,
                                                                       api_version="v1beta"))
    blob = types.Part(inline_data=types.Blob(data=INPUTS["png"] + bytes(16 * 1024 * 1024), mime_type="image/png"))
    with pytest.raises(genai_errors.ClientError) as info:
        client.models.generate_content(model="gemini-2.5-flash-image", contents=["edit", blob])
    assert info.value.code == 400 and "payload size exceeds the limit" in info.value.message


# --- kind 3: never refuse what the service accepts --------------------------------------------------------


def test_png_with_output_compression_is_accepted_with_a_warning(emu: Any) -> None:
    """pydantic-ai's recorded cassette: OpenAI answered png + output_compression=100 with 200."""
    with pytest.warns(InputWarning, match="no effect"):
        tool = ImageGenerationTool(output_format="png", output_compression=100)
    with pytest.warns(InputWarning):
        ImageGenerationTool(output_compression=50)  # png is the default format
    agent = Agent("a", config=OpenAIResponsesConfig(model="gpt-5", api_key=KEY, base_url=emu.openai_base_url,
                                                    max_retries=0), tools=[tool])
    reply = agent.ask_sync("an axolotl")
    assert reply.files[0].media_type == "image/png"
    assert emu.requests[-1].json["tools"][0]["output_compression"] == 100


def test_tool_values_are_the_sdks_own() -> None:
    """Every value ImageGenerationTool accepts is one the openai SDK types; none it types is refused
    except output formats nbimagine cannot return as images yet (gif animations, svg)."""
    import typing

    from openai.types.responses.tool_param import ImageGeneration

    from nbimagine import tools

    hints = typing.get_type_hints(ImageGeneration)

    def literal(name: str) -> set[str]:
        found: set[str] = set()
        for arg in typing.get_args(hints[name]) or ():
            found |= set(typing.get_args(arg)) if typing.get_args(arg) else {arg}
        return {v for v in found if isinstance(v, str)}

    for name, ours in (("quality", tools.QUALITIES), ("background", tools.BACKGROUNDS),
                       ("moderation", tools.MODERATIONS), ("input_fidelity", tools.INPUT_FIDELITIES),
                       ("action", tools.ACTIONS), ("output_format", tools.OUTPUT_FORMATS)):
        sdk = literal(name)
        assert set(ours) <= sdk, name
        assert sdk - set(ours) <= ({"gif", "svg"} if name == "output_format" else set()), name


# The Gemini image models' own image limits per prompt (_providers/_inputs.py GEMINI_IMAGE_LIMITS): the edited
# image and the references. Refused before the request where the service refuses, warned where the number is
# only a recommendation, and answered 400 by the emulator wherever the client would refuse.
REF_CASES = [
    # (model, vertex, images, expected)
    ("gemini-2.5-flash-image", False, 3, "ok"),
    ("gemini-2.5-flash-image", False, 4, "warned"),
    ("gemini-2.5-flash-image", True, 3, "ok"),
    ("gemini-2.5-flash-image", True, 4, "refused"),
    ("gemini-3-pro-image", False, 14, "ok"),
    ("gemini-3-pro-image", False, 15, "refused"),
    ("gemini-3-pro-image-preview", True, 15, "refused"),
    ("gemini-3.1-flash-image", False, 14, "ok"),
    ("gemini-3.1-flash-image", True, 15, "refused"),
]


def _ref_agent(emu: Any, model: str, vertex: bool) -> Agent:
    from google.oauth2.credentials import Credentials

    from nbimagine.config import VertexAIConfig

    if vertex:
        config: Any = VertexAIConfig(model=model, project="p", location="global", credentials=Credentials(token="t"),
                                     base_url=emu.vertex_base_url, max_retries=0)
    else:
        config = GeminiConfig(model=model, api_key=GKEY, max_retries=0, base_url=emu.gemini_base_url)
    return Agent("a", config=config)


@pytest.mark.parametrize(("model", "vertex", "count", "expected"), REF_CASES)
def test_gemini_image_models_reference_limits(emu: Any, model: str, vertex: bool, count: int, expected: str) -> None:
    agent = _ref_agent(emu, model, vertex)
    first, *refs = [ImageInput(data=INPUTS["png"]) for _ in range(count)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if expected == "refused":
            with pytest.raises(InputError, match=f"{count} images in one prompt.*at most"):
                agent.ask_sync("combine these", first, refs=refs)
        else:
            assert agent.ask_sync("combine these", first, refs=refs).files
    warned = [w for w in caught if issubclass(w.category, InputWarning) and "images in one prompt" in str(w.message)]
    assert bool(warned) == (expected == "warned")
    assert len(emu.requests) == (0 if expected == "refused" else 1)
    # The emulator, sent the same request without the client's check, answers what the service answers.
    parts = [{"text": "combine these"}] + [{"inlineData": {"mimeType": "image/png",
                                                          "data": base64.b64encode(INPUTS["png"]).decode()}}] * count
    if vertex:
        url = (f"{emu.vertex_base_url}/v1beta1/projects/p/locations/global/publishers/google/models/"
               f"{model}:generateContent")
        headers = {"authorization": "Bearer t"}
    else:
        url = f"{emu.gemini_base_url}/v1beta/models/{model}:generateContent"
        headers = {"x-goog-api-key": GKEY}
    request = urllib.request.Request(url, data=json.dumps({"contents": [{"role": "user", "parts": parts}]}).encode(),
                                     method="POST", headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status = answer.status
    except urllib.error.HTTPError as err:
        status, body = err.code, json.loads(err.read())
        assert body["error"]["status"] == "INVALID_ARGUMENT" and f"{count} images" in body["error"]["message"]
    assert status == (400 if expected == "refused" else 200)


def test_a_mask_with_a_url_image_works_on_gemini(emu: Any, tmp_path: Any) -> None:
    """The mask guide is drawn on the fetched bytes (it used to need bytes before the URL was fetched)."""
    import http.server
    import threading

    (tmp_path / "photo.png").write_bytes(image("PNG", size=(64, 64)))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 32))
    out = io.BytesIO()
    mask.save(out, "PNG")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photo.png"
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            reply = gemini_agent(emu).ask_sync("paint it blue", ImageInput(url=url), mask=out.getvalue())
    finally:
        server.shutdown()
        server.server_close()
    assert reply.files and reply.files[0].metadata.get("mask") == "guide"
    parts = emu.requests[0].json["contents"][-1]["parts"]
    assert sum(1 for p in parts if "inlineData" in p or "inline_data" in p) == 2  # the image and its guide
