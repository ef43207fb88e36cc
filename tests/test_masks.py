"""Masks end to end: checked before the request, converted where that loses nothing, refused by the
emulator as by the real API, and applied so that only the masked region changes (pixel comparison)."""

from __future__ import annotations

import io
import warnings

import openai
import pytest
from PIL import Image, ImageChops, ImageDraw

from nbimagine import Agent
from nbimagine.config import GeminiConfig, OpenAIImagesConfig, OpenAIResponsesConfig
from nbimagine.errors import ConfigError, InputError, InputWarning
from nbimagine.events import ImageInput
from nbimagine.tools import ImageGenerationTool

KEY = "sk-emulator-test-key-0123456789"
SIZE = (256, 256)
BOX = (64, 96, 160, 192)  # the region to change


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def photo(size: tuple[int, int] = SIZE) -> bytes:
    image = Image.new("RGB", size, (30, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 20, size[0] - 20, size[1] - 20), fill=(240, 200, 40))
    return encode(image)


def alpha_mask(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] = BOX) -> bytes:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0, 0))
    return encode(image)


def bw_mask(mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = SIZE) -> bytes:
    image = Image.new(mode, size, "black")
    ImageDraw.Draw(image).rectangle(BOX, fill="white")
    return encode(image, fmt)


def images_agent(emu) -> Agent:
    return Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, max_retries=0))


def tool_agent(emu) -> Agent:
    config = OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url=emu.openai_base_url, max_retries=0,
                                   tool_choice="image_generation")
    return Agent("r", config=config, tools=[ImageGenerationTool(size="auto")])


def gemini_agent(emu) -> Agent:
    return Agent("g", config=GeminiConfig(model="gemini-3.1-flash-image", api_key=KEY, base_url=emu.gemini_base_url,
                                          api_version="v1beta", max_retries=0))


AGENTS = {"images": images_agent, "responses": tool_agent}


def changed_region(before: bytes, after: bytes) -> tuple[int, int, int, int] | None:
    a = Image.open(io.BytesIO(before)).convert("RGB")
    b = Image.open(io.BytesIO(after)).convert("RGB")
    assert a.size == b.size
    return ImageChops.difference(a, b).getbbox()


# --- the validation table: checked before any request ---------------------------------------------

def _colour_mask() -> bytes:
    image = Image.new("RGB", SIZE, (200, 30, 30))
    ImageDraw.Draw(image).rectangle(BOX, fill=(20, 200, 40))
    return encode(image)


def _webp_alpha() -> bytes:
    return encode(Image.open(io.BytesIO(alpha_mask())), "WEBP")


def _drawn(mode: str, background: object, region: object, **save: object) -> bytes:
    image = Image.new(mode, SIZE, background)  # type: ignore[arg-type]
    ImageDraw.Draw(image).rectangle(BOX, fill=region)  # type: ignore[arg-type]
    return encode(image, **save)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", SIZE, 1)
    image.putpalette([0, 0, 0] * 256)
    ImageDraw.Draw(image).rectangle(BOX, fill=0)
    out = io.BytesIO()
    image.save(out, "PNG", transparency=0)  # a tRNS chunk: colour 0 is transparent
    return out.getvalue()


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` zeros: ~190 KB on disk, 1.6 gigapixels decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    squeeze = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# (name, mask bytes, what happens: "sent" / "converted" / an InputError message fragment)
MASKS = [
    ("alpha png", alpha_mask(), "sent"),
    ("black-and-white png", bw_mask(), "converted"),
    ("greyscale png", bw_mask("L"), "converted"),
    ("black-and-white jpeg", bw_mask(fmt="JPEG"), "converted"),
    ("opaque rgba black-and-white", bw_mask("RGBA"), "converted"),
    ("webp with alpha", _webp_alpha(), "converted"),
    ("colour without alpha", _colour_mask(), "colour image without transparency"),
    ("all black", encode(Image.new("RGB", SIZE, "black")), "marks no region"),
    ("wrong size", alpha_mask((128, 128), (8, 8, 40, 40)), "must be the same size"),
    ("wrong size black-and-white", bw_mask(size=(512, 512)), "must be the same size"),
    # Every PNG mode a mask arrives in from other tools.
    ("palette png with a transparent colour", _palette_with_transparency(), "sent"),
    ("greyscale with alpha", _drawn("LA", (0, 255), (0, 0)), "sent"),
    ("1-bit black-and-white", _drawn("1", 0, 1), "converted"),
    ("16-bit greyscale", _drawn("I;16", 0, 65535), "converted"),
    # A soft brush that never reached full transparency marks nothing OpenAI would change.
    ("alpha without a fully transparent pixel", _drawn("RGBA", (0, 0, 0, 255), (0, 0, 0, 40)),
     "its most transparent pixel has alpha 40"),
    ("truncated png", alpha_mask()[:300], "cannot be read"),
    ("not an image", b"<html>a proxy error page</html>", "Unsupported image type"),
    # 1.6 gigapixels in 190 KB: refused from its header, before a pixel is decoded.
    ("decompression bomb", png_bomb(), "The mask is 40000x40000 but the image to edit is 256x256"),
]


@pytest.mark.parametrize("api", AGENTS)
@pytest.mark.parametrize(("name", "mask", "outcome"), MASKS, ids=[m[0] for m in MASKS])
def test_mask_validation_table(emu, api: str, name: str, mask: bytes, outcome: str) -> None:
    agent = AGENTS[api](emu)
    if outcome in ("sent", "converted"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reply = agent.ask_sync("Add a red door", photo(), mask=ImageInput(data=mask))
        notes = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
        assert bool(notes) == (outcome == "converted"), notes
        if notes:
            assert "converted the mask" in notes[0]
        assert reply.files[0].metadata["mask"] == "native"
        # Whatever was given, the region that changed is the one the mask marks.
        assert changed_region(photo(), reply.files[0].data) == (BOX[0], BOX[1], BOX[2] + 1, BOX[3] + 1)
    else:
        with pytest.raises(InputError, match=outcome):
            agent.ask_sync("Add a red door", photo(), mask=ImageInput(data=mask))
        assert emu.requests == []


def test_a_bomb_costs_no_memory() -> None:
    import tracemalloc

    from nbimagine._masks import prepare_mask

    bomb = png_bomb()
    tracemalloc.start()
    with pytest.raises(InputError, match="must be the same size"):
        prepare_mask(ImageInput(data=bomb), ImageInput(data=photo()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak


@pytest.mark.parametrize("api", AGENTS)
def test_a_mask_of_4_mb_or_more_is_refused_before_the_request(emu, api: str) -> None:
    import random

    size = (1100, 1100)  # noise does not compress: about 4.8 MB as PNG
    rng = random.Random(15)
    noisy = Image.frombytes("RGBA", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 4)))
    noisy.putpixel((0, 0), (0, 0, 0, 0))
    mask = encode(noisy)
    assert len(mask) >= 4 * 1024 * 1024
    with pytest.raises(InputError, match=r"OpenAI takes masks under 4\.0 MB"):
        AGENTS[api](emu).ask_sync("Add a door", photo(size), mask=mask)
    assert emu.requests == []


@pytest.mark.parametrize("api", AGENTS)
def test_a_mask_needs_an_image(emu, api: str) -> None:
    with pytest.raises(InputError, match="needs an image to edit"):
        AGENTS[api](emu).ask_sync("Add a door", mask=alpha_mask())
    with pytest.raises(InputError, match="not a string"):
        AGENTS[api](emu).ask_sync("Add a door", photo(), mask="mask.png")
    assert emu.requests == []


def test_mask_kinds_are_the_input_kinds(emu, tmp_path) -> None:
    path = tmp_path / "mask.png"
    path.write_bytes(alpha_mask())
    agent = images_agent(emu)
    for mask in (path, alpha_mask(), Image.open(io.BytesIO(alpha_mask())), ImageInput(path=path)):
        reply = agent.ask_sync("Add a door", photo(), mask=mask)
        assert changed_region(photo(), reply.files[0].data) == (64, 96, 161, 193)


def test_the_image_tool_sends_the_mask_as_input_image_mask(emu) -> None:
    with pytest.warns(InputWarning, match="black-and-white to alpha"):
        tool_agent(emu).ask_sync("Add a door", photo(), mask=bw_mask())
    tool = emu.requests[-1].json["tools"][0]
    sent = tool["input_image_mask"]["image_url"]
    assert sent.startswith("data:image/png;base64,")  # converted to alpha before it left


def test_ask_mask_wins_over_the_tools_mask_and_the_tools_mask_stays(emu) -> None:
    other = alpha_mask(box=(0, 0, 31, 31))
    config = OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url=emu.openai_base_url)
    agent = Agent("r", config=config, tools=[ImageGenerationTool(input_image_mask=ImageInput(data=other))])
    reply = agent.ask_sync("Add a door", photo())
    assert changed_region(photo(), reply.files[0].data) == (0, 0, 32, 32)
    reply = agent.ask_sync("Add a door", photo(), mask=alpha_mask())
    assert changed_region(photo(), reply.files[0].data) == (64, 96, 161, 193)


def test_a_mask_without_the_image_tool_is_a_config_error() -> None:
    agent = Agent("r", config=OpenAIResponsesConfig(model="gpt-4.1", api_key=KEY, base_url="http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="image tool"):
        agent.ask_sync("x", photo(), mask=alpha_mask())


def test_the_stored_conversations_image_can_be_masked(emu) -> None:
    agent = tool_agent(emu)
    first = agent.ask_sync("A house", photo())
    edited = first.ask_sync("Add a door", mask=alpha_mask())
    assert changed_region(first.files[0].data, edited.files[0].data) == (64, 96, 161, 193)


async def test_streamed_masked_edit(emu) -> None:
    agent = Agent("i", config=OpenAIImagesConfig(api_key=KEY, base_url=emu.openai_base_url, partial_images=1))
    events = [e async for e in agent.stream("Add a door", photo(), mask=alpha_mask())]
    reply = events[-1].reply
    assert changed_region(photo(), reply.files[0].data) == (64, 96, 161, 193)


# --- the emulator refuses masks as the real API does ----------------------------------------------

EMULATOR_REFUSES = [
    ("no alpha", bw_mask(), "mask image missing alpha channel"),
    ("jpeg", bw_mask(fmt="JPEG"), "mask must be a PNG image"),
    ("other size", alpha_mask((128, 128), (0, 0, 9, 9)), "mask size does not match image size"),
]


@pytest.mark.parametrize(("name", "mask", "message"), EMULATOR_REFUSES, ids=[e[0] for e in EMULATOR_REFUSES])
def test_the_emulator_refuses_bad_masks_with_the_real_error(emu, name: str, mask: bytes, message: str) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=emu.openai_base_url, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-2", prompt="x", image=("a.png", photo(), "image/png"),
                           mask=("m.png", mask, "image/png"))
    body = caught.value.body
    assert body["code"] == "invalid_mask_image_format" and body["type"] == "image_generation_user_error"
    assert body["message"] == f"Invalid mask image format - {message}"
    # The image tool's input_image_mask is checked the same way.
    import base64

    url = "data:image/png;base64," + base64.b64encode(mask).decode()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="gpt-4.1", tools=[{"type": "image_generation", "input_image_mask": {"image_url": url}}],
            input=[{"role": "user", "content": [
                {"type": "input_text", "text": "x"},
                {"type": "input_image", "image_url": "data:image/png;base64," + base64.b64encode(photo()).decode()}]}])
    assert caught.value.body["code"] == "invalid_mask_image_format"
    assert caught.value.body["param"] == "tools[0].input_image_mask"


# --- Gemini: the documented fallback --------------------------------------------------------------

def test_gemini_gets_the_mask_as_a_visible_guide_and_says_so(emu) -> None:
    with pytest.warns(InputWarning) as caught:
        reply = gemini_agent(emu).ask_sync("Add a red door", photo(), mask=bw_mask())
    notes = [str(w.message) for w in caught]
    assert any("black-and-white to alpha" in n for n in notes)
    assert any("Gemini has no mask parameter" in n for n in notes)
    assert reply.files[0].metadata["mask"] == "guide"
    parts = emu.requests[-1].json["contents"][-1]["parts"]
    images = [p["inlineData"] for p in parts if "inlineData" in p]
    assert len(images) == 2
    texts = [p["text"] for p in parts if "text" in p]
    assert texts[0] == "Add a red door" and "highlighted in magenta" in texts[-1]
    from nbimagine._images import b64decode_any

    guide = Image.open(io.BytesIO(b64decode_any(images[1]["data"]))).convert("RGB")
    original = Image.open(io.BytesIO(photo())).convert("RGB")
    # Inside the region the guide is tinted towards magenta; far outside it is the original image.
    r, g, b = guide.getpixel((112, 144))
    assert r > g and b > g
    assert guide.getpixel((220, 20)) == original.getpixel((220, 20))
