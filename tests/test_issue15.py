"""Every example of issue 15 ("Masks, several images per call, and reference images"), as written there,
through the public surface: the real ``openai`` and ``google-genai`` SDKs over HTTP against the emulator, and
the magics in a real ``InteractiveShell``. The kinds each example belongs to are tested table by table in
``test_images_api.py``, ``test_masks.py``, ``test_images_providers.py``, ``test_studio_mask.py`` and
``test_browser_mask.py``; here each example is checked once, in the issue's own words."""

from __future__ import annotations

import io
import warnings

import pytest
from IPython.core.error import UsageError
from PIL import Image, ImageChops, ImageDraw
from test_magics import imagine  # the `ip` shell fixture is in conftest.py

from nbimagine import Agent
from nbimagine.config import AzureOpenAIImagesConfig, GeminiConfig, OpenAIImagesConfig, OpenAIResponsesConfig
from nbimagine.errors import InputError, InputWarning
from nbimagine.events import ImageInput, PartialImageEvent
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def photo(size: tuple[int, int] = (256, 256), fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", size, (30, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 20, size[0] - 20, size[1] - 20), fill=(240, 200, 40))
    return encode(image, fmt)


def alpha_mask(size: tuple[int, int] = (256, 256), box: tuple[int, int, int, int] = (64, 96, 160, 192)) -> bytes:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0, 0))
    return encode(image)


def changed(before: bytes, after: bytes) -> tuple[int, int, int, int] | None:
    return ImageChops.difference(Image.open(io.BytesIO(before)).convert("RGB"),
                                 Image.open(io.BytesIO(after)).convert("RGB")).getbbox()


def image_calls(emu) -> list:
    return [r for r in emu.requests if "/images/" in r.path]


# "OpenAI Images API as a provider config (OpenAIImagesConfig(model="gpt-image-2", n=4, size=..., quality=...), and
# its Azure twin): images.generate and images.edit through the official SDK, n 1-10 in one call"
@pytest.mark.parametrize("twin", ["openai", "azure"])
def test_the_images_api_config_and_its_azure_twin(emu, twin) -> None:
    params = {"n": 4, "size": "1536x1024", "quality": "high", "api_key": KEY, "max_retries": 0}
    config = (OpenAIImagesConfig(model="gpt-image-2", base_url=emu.openai_base_url, **params) if twin == "openai"
              else AzureOpenAIImagesConfig(model="gpt-image-2", azure_endpoint=emu.azure_endpoint,
                                           api_version="2025-04-01-preview", **params))
    agent = Agent("images", config=config)
    reply = agent.ask_sync("A lighthouse at dusk")
    assert len(image_calls(emu)) == 1 and image_calls(emu)[0].path.endswith("/images/generations")
    # "every image in reply.files with its metadata and usage"
    assert len(reply.files) == 4 and all(f.metadata["size"] == "1536x1024" and f.metadata["quality"] == "high"
                                         for f in reply.files)
    assert reply.usage.images == 4 and reply.usage.output_image_tokens > 0 and reply.cost is not None
    # ... and images.edit: the same agent edits when the request holds images.
    edited = agent.ask_sync("Make it night", reply.files[0])
    assert image_calls(emu)[-1].path.endswith("/images/edits") and len(edited.files) == 4


# "up to 16 input images, mask, input_fidelity, moderation, streaming partial images"
def test_sixteen_inputs_mask_fidelity_moderation_and_partials(emu) -> None:
    def agent(**params: object) -> Agent:
        return Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0,
                                                    **params))

    reply = agent(model="gpt-image-1.5", input_fidelity="high").ask_sync(
        "Put them together", photo(), *[photo((64, 64))] * 15, mask=alpha_mask())
    sent = image_calls(emu)[-1].json
    assert len(sent["files"]["image[]"]) == 16 and sent["files"]["mask"][0]["media_type"] == "image/png"
    assert sent["input_fidelity"] == "high" and reply.files[0].metadata["mask"] == "native"
    with pytest.raises(InputError, match="17 input images; gpt-image-2 edits take at most 16"):
        agent().ask_sync("x", *[photo((64, 64))] * 17)
    agent(moderation="low").ask_sync("A fox")
    assert image_calls(emu)[-1].json["moderation"] == "low"

    async def stream() -> list:
        return [e async for e in agent(partial_images=2).stream("A fox")]

    import asyncio

    events = asyncio.run(stream())
    assert len([e for e in events if isinstance(e, PartialImageEvent)]) == 2


# "Same Agent.ask / stream surface; validation before any request."
def test_validation_before_any_request(emu) -> None:
    from nbimagine.errors import ConfigError

    with pytest.raises(ConfigError, match="n must be an integer from 1 to 10"):
        OpenAIImagesConfig(model="gpt-image-2", n=11)
    assert emu.requests == []


# "agent.ask(prompt, image, mask=ImageInput(...)) for the Responses tool and the Images API (the tool's
# input_image_mask stays)"
def test_ask_with_a_mask_for_the_responses_tool_and_the_images_api(emu) -> None:
    tool = ImageGenerationTool(size="auto", input_image_mask=ImageInput(data=alpha_mask(box=(0, 0, 31, 31))))
    responses = Agent("r", config=OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url=emu.openai_base_url,
                                                        tool_choice="image_generation", max_retries=0), tools=[tool])
    images = Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0))
    for agent in (responses, images):
        reply = agent.ask_sync("Add a red door", photo(), mask=ImageInput(data=alpha_mask()))
        assert changed(photo(), reply.files[0].data) == (64, 96, 161, 193)
    # The tool's own mask stays: without ask(mask=) it is the one used.
    reply = responses.ask_sync("Add a red door", photo())
    assert changed(photo(), reply.files[0].data) == (0, 0, 32, 32)


# "checked before the request (PNG with an alpha channel, same size as the first input; a black-and-white mask
# converted, and said so)"
def test_masks_are_checked_and_black_and_white_ones_converted(emu) -> None:
    agent = Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0))
    with pytest.raises(InputError, match="must be the same size"):
        agent.ask_sync("x", photo(), mask=alpha_mask((128, 128), (0, 0, 9, 9)))
    with pytest.raises(InputError, match="colour image without transparency"):
        agent.ask_sync("x", photo(), mask=photo())
    assert emu.requests == []
    bw = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(bw).rectangle((64, 96, 160, 192), fill=255)
    with pytest.warns(InputWarning, match="converted the mask from black-and-white to alpha"):
        reply = agent.ask_sync("x", photo(), mask=encode(bw))
    assert changed(photo(), reply.files[0].data) == (64, 96, 161, 193)


# "Gemini has no mask parameter: offer a documented fallback (the mask drawn as a visible guide with an
# instruction) and label it as such."
def test_gemini_gets_a_labelled_guide(emu) -> None:
    agent = Agent("g", config=GeminiConfig(model="gemini-3.1-flash-image", api_key=KEY, base_url=emu.gemini_base_url,
                                           api_version="v1beta", max_retries=0))
    with pytest.warns(InputWarning, match="guide"):
        reply = agent.ask_sync("Add a red door", photo(), mask=alpha_mask())
    assert reply.files[0].metadata["mask"] == "guide"
    parts = emu.requests[-1].json["contents"][-1]["parts"]
    assert len([p for p in parts if "inlineData" in p or "inline_data" in p]) == 2  # the image, then the guide


# "-n makes N separate calls" -> with the Images API, -n is one call; "-e repeatable already; make several
# references a first-class use (-r / refs=), with each provider's limits (count, size) checked before the request"
def test_n_is_one_call_and_refs_are_first_class_in_the_notebook(ip, emu) -> None:
    ip.user_ns.update(logo=photo((64, 64)), sketch=photo((64, 64), "JPEG"), style=photo((64, 64), "WEBP"))
    imagine(ip, "-p openai-images --size 1024x1024 -n 3 -o first", "a mug")
    assert len(image_calls(emu)) == 1 and len(ip.user_ns["first"].files) == 3
    imagine(ip, "-p openai-images -e last -e -2 -r logo -r sketch -r style -o edited", "put the logo on the mug")
    files = image_calls(emu)[-1].json["files"]["image[]"]
    assert [f["media_type"] for f in files] == ["image/png", "image/png", "image/png", "image/jpeg", "image/webp"]
    emu.reset()
    with pytest.raises(UsageError, match="17 input images; gpt-image-2 edits take at most 16") as info:
        imagine(ip, "-p openai-images -e last " + " ".join(["-r logo"] * 16), "too many")
    assert "\n" not in str(info.value) and emu.requests == []
    # The retired DALL-E 2's own rules: one square PNG.
    ip.user_ns["wide"] = photo((96, 64))
    with pytest.raises(UsageError, match="dall-e-2 edits square images only"):
        imagine(ip, "-p openai-images -m dall-e-2 -e wide", "x")
    with pytest.raises(UsageError, match="2 input images; dall-e-2 edits take at most 1"):
        imagine(ip, "-p openai-images -m dall-e-2 -e logo -r logo", "x")
    assert emu.requests == []
    ip.user_ns["door"] = alpha_mask((64, 64), (8, 8, 23, 23))
    imagine(ip, "-p openai-images -m dall-e-2 --size 256x256 -n 2 -e logo --mask door -o old", "a door")
    sent = image_calls(emu)[-1].json
    assert sent["n"] == "2" and sent["response_format"] == "b64_json" and list(sent["files"]) == ["image", "mask"]
    assert len(ip.user_ns["old"].files) == 2


# "refs=" from Python
def test_refs_from_python(emu) -> None:
    agent = Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.ask_sync("Print the logo on the mug", photo(), refs=[photo((64, 64)), photo((64, 64), "JPEG")])
    assert len(image_calls(emu)[-1].json["files"]["image[]"]) == 3


# "A mask painter in the notebook: in the studio (and %imagine mask REF) ... the mask is saved in the history as the
# edit's input (lineage shows image + mask) and used by "Edit selected"" -- the painter itself is driven with a
# real mouse in test_browser_mask.py; here its mask (what the page publishes) goes through the magic.
def test_imagine_mask_ref_then_edit_keeps_image_and_mask_in_the_lineage(ip, emu) -> None:
    import base64

    import nbimagine

    imagine(ip, "--size 1024x1024", "a house")
    painter = ip.run_line_magic("imagine", "mask last -o m")
    painter.mask_url = "data:image/png;base64," + base64.b64encode(
        alpha_mask((1024, 1024), (100, 100, 299, 299))).decode()
    imagine(ip, "-e last --mask m -o edited", "a red door")
    history = nbimagine.history()
    edit = history.get(ip.user_ns["edited"].files[0].metadata["history_id"])
    assert [e.model for e in history.lineage(edit.id)][1] == "mask"
    assert changed(history.get(1).image.data, edit.image.data) == (100, 100, 300, 300)


# "Emulator: the Images API routes (generate, edit with mask, n, partial images), drawing edits so that only the
# masked region changes" -- raw SDK calls, around nbimagine.
def test_the_emulator_serves_the_images_api_routes(emu) -> None:
    import base64

    import openai

    client = openai.OpenAI(api_key=KEY, base_url=emu.openai_base_url, max_retries=0)
    generated = client.images.generate(model="gpt-image-2", prompt="a fox", n=2, size="1024x1024")
    assert len(generated.data) == 2
    edited = client.images.edit(model="gpt-image-2", prompt="a hat", image=("a.png", photo(), "image/png"),
                                mask=("m.png", alpha_mask(), "image/png"))
    assert changed(photo(), base64.b64decode(edited.data[0].b64_json)) == (64, 96, 161, 193)
    events = list(client.images.generate(model="gpt-image-2", prompt="a fox", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
