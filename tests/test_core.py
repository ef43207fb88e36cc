"""Unit tests of the provider-independent core: validation, inputs, results, errors, secrets."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nbimagine import Agent
from nbimagine.config import AzureOpenAIResponsesConfig, GeminiConfig, OpenAIConfig, OpenAIResponsesConfig
from nbimagine.errors import ConfigError, InputError, ProviderError, UnsupportedToolError
from nbimagine.events import BinaryResult, ImageInput
from nbimagine.tools import ImageGenerationTool


def png(width: int = 32, height: int = 24, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def encoded(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, fmt)
    return buffer.getvalue()


# --- ImageGenerationTool ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"quality": "ultra"}, "quality must be one of"),
    ({"background": "green"}, "background must be one of"),
    ({"output_format": "bmp"}, "output_format must be one of"),
    ({"output_compression": 500, "output_format": "jpeg"}, "output_compression must be an integer from 0 to 100"),
    ({"partial_images": 9}, "partial_images must be an integer from 0 to 3"),
    ({"partial_images": True}, "partial_images must be an integer"),
    ({"moderation": "strict"}, "moderation must be one of"),
    ({"input_fidelity": "medium"}, "input_fidelity must be one of"),
    ({"action": "paint"}, "action must be one of"),
    ({"size": "1000x1000"}, "multiples of 16"),
    ({"size": "4096x2048"}, "between 16 and 3840"),
    ({"size": "3840x1024"}, "at most 3 times"),
    ({"size": "big"}, "'WIDTHxHEIGHT'"),
    ({"background": "transparent", "output_format": "jpeg"}, "JPEG has no transparency"),
])
def test_tool_rejects_bad_parameters(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ImageGenerationTool(**kwargs)


@pytest.mark.parametrize("size", ["auto", "1024x1024", "1536x1024", "1024x1536", "2048x1152", "3840x2160", "3072x1024"])
def test_tool_accepts_standard_and_free_form_sizes(size: str) -> None:
    assert ImageGenerationTool(size=size).size == size


def test_tool_sends_only_what_was_set() -> None:
    assert ImageGenerationTool().params() == {}
    tool = ImageGenerationTool(quality="high", output_format="jpg", output_compression=80, partial_images=2)
    assert tool.params() == {"quality": "high", "output_format": "jpeg", "output_compression": 80, "partial_images": 2}


# --- configs and agents -------------------------------------------------------------------------

def test_config_reprs_never_show_secrets() -> None:
    config = AzureOpenAIResponsesConfig("gpt-4.1", api_key="sk-supersecret-123456", azure_ad_token="tok-abcdefgh")
    text = repr(config) + str(config)
    assert "supersecret" not in text and "tok-abcdefgh" not in text
    assert "api_key=<set>" in text
    agent = Agent("a", config=config)
    assert "supersecret" not in repr(agent)


def test_secret_headers_are_masked_in_reprs() -> None:
    config = GeminiConfig("gemini-3.1-flash-image", headers={"Authorization": "Bearer tok-0123456789",
                                                            "x-goog-api-key": "AIzaSecret123", "X-Trace": "t1"})
    text = repr(config)
    assert "tok-0123456789" not in text and "AIzaSecret123" not in text
    assert "'X-Trace': 't1'" in text and "'Authorization': '***'" in text


def test_bad_config_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs a model name"):
        OpenAIResponsesConfig(model="")
    with pytest.raises(ConfigError, match="timeout"):
        OpenAIResponsesConfig("gpt-4.1", timeout=0)
    with pytest.raises(ConfigError, match="max_retries"):
        OpenAIResponsesConfig("gpt-4.1", max_retries=-1)
    with pytest.raises(ConfigError, match="tool_choice"):
        OpenAIResponsesConfig("gpt-4.1", tool_choice="always")
    with pytest.raises(ConfigError, match="not both"):
        AzureOpenAIResponsesConfig("gpt-4.1", base_url="http://x/openai/v1/", azure_endpoint="http://x")
    with pytest.raises(ConfigError, match="cannot be empty"):
        GeminiConfig("gemini-3.1-flash-image", response_modalities=[])
    with pytest.raises(ConfigError, match="provider config"):
        Agent("a", config="gpt-4.1")  # type: ignore[arg-type]


def test_image_tool_on_chat_completions_is_refused_at_construction() -> None:
    with pytest.raises(UnsupportedToolError, match="requires the Responses API"):
        Agent("a", config=OpenAIConfig(model="gpt-4.1"), tools=[ImageGenerationTool()])


def test_missing_key_is_a_config_error_naming_the_variable() -> None:
    # The base URL points nowhere: reaching the network would give a connection error instead.
    agent = Agent("a", config=OpenAIResponsesConfig("gpt-4.1", base_url="http://127.0.0.1:9/v1"),
                  tools=[ImageGenerationTool()])
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        agent.ask_sync("a cat")
    azure = Agent("a", config=AzureOpenAIResponsesConfig("gpt-4.1", azure_endpoint="http://127.0.0.1:9"),
                  tools=[ImageGenerationTool()])
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        azure.ask_sync("a cat")
    azure_key = Agent("a", config=AzureOpenAIResponsesConfig("gpt-4.1", api_key="k" * 10,
                                                             azure_endpoint="http://127.0.0.1:9"),
                      tools=[ImageGenerationTool()])
    with pytest.raises(ConfigError, match="image_deployment"):
        azure_key.ask_sync("a cat")


def test_ask_needs_inputs_it_can_send() -> None:
    agent = Agent("a", config=OpenAIResponsesConfig("gpt-4.1", api_key="sk-x"))
    with pytest.raises(InputError, match="at least one input"):
        agent.ask_sync()
    with pytest.raises(InputError, match="Cannot send a dict"):
        agent.ask_sync({"prompt": "x"})


# --- ImageInput ---------------------------------------------------------------------------------

def test_image_input_takes_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="exactly one"):
        ImageInput()
    with pytest.raises(InputError, match="got url, data"):
        ImageInput("https://example.com/a.png", data=png())


def test_image_input_from_path_checks_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Image file not found"):
        ImageInput(path=tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match=r"Unsupported image type in .*notes\.png"):
        ImageInput(path=text)
    good = tmp_path / "robot.png"
    good.write_bytes(png())
    image = ImageInput(path=good)
    assert image.media_type == "image/png" and image.data == good.read_bytes() and image.path == good


def test_image_input_corrects_a_wrong_media_type_from_the_bytes() -> None:
    assert ImageInput(data=encoded("JPEG"), media_type="image/png").media_type == "image/jpeg"
    assert ImageInput(data=encoded("WEBP")).media_type == "image/webp"
    assert ImageInput(data=encoded("GIF")).media_type == "image/gif"


def test_image_input_rejects_oversized_data() -> None:
    huge = b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024)
    with pytest.raises(InputError, match=r"the limit is 50\.0 MB"):
        ImageInput(data=huge)


def test_image_input_parses_data_urls_and_checks_file_ids() -> None:
    import base64

    url = "data:image/png;base64," + base64.urlsafe_b64encode(png()).decode()  # URL-safe alphabet too
    assert ImageInput(url).data == png()
    with pytest.raises(InputError, match="base64"):
        ImageInput("data:image/png,rawtext")
    with pytest.raises(InputError, match="file_id"):
        ImageInput(file_id=" ")
    with pytest.raises(InputError, match="detail"):
        ImageInput(file_id="file-1", detail="max")


# --- BinaryResult -------------------------------------------------------------------------------

def test_binary_result_reads_type_and_size_from_bytes() -> None:
    for fmt, media_type in [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")]:
        result = BinaryResult(encoded(fmt, (41, 29)), {"media_type": "image/png"})
        assert result.media_type == media_type
        assert (result.width, result.height) == (41, 29)


def test_binary_result_is_immutable_and_picklable() -> None:
    result = BinaryResult(png(), {"provider": "openai"})
    with pytest.raises(TypeError, match="read-only"):
        result.metadata["media_type"] = "image/jpeg"  # type: ignore[index]
    with pytest.raises(AttributeError):
        result.data = b""  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(result)) == result
    assert repr(result) == f"BinaryResult(image/png, 32x24, {len(result.data)} B, provider='openai')"


def test_binary_result_save_picks_names_and_converts(tmp_path: Path) -> None:
    result = BinaryResult(png(mode="RGBA"), {"call_id": "ig_123"})
    assert result.save(tmp_path).name == "ig_123.png"
    assert result.save(tmp_path / "logo").name == "logo.png"
    jpeg = result.save(tmp_path / "logo.jpeg")  # RGBA cannot be JPEG: flattened, not crashed
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"
    assert result.to_pil().size == (32, 24)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_saved_as_jpeg_is_flattened_onto_white(tmp_path: Path, mode: str) -> None:
    from PIL import Image

    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent, colour black underneath
    image.paste((200, 30, 30, 255), (0, 0, 20, 20))  # left half: opaque red
    if mode != "RGBA":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    saved = Image.open(BinaryResult(buffer.getvalue()).save(tmp_path / "out.jpg"))
    assert saved.format == "JPEG"
    assert min(saved.convert("RGB").getpixel((35, 10))) > 245  # white, not black
    assert min(saved.convert("RGB").getpixel((5, 10))) < 150  # the opaque part is kept


# --- errors -------------------------------------------------------------------------------------

def test_provider_errors_mask_secrets_and_keep_files() -> None:
    image = BinaryResult(png())
    error = ProviderError("Incorrect API key provided: sk-proj-abcdef123456", provider="openai", status=401,
                          request_id="req_1", files=[image])
    text = str(error)
    assert "sk-proj-abcdef123456" not in text and "***" in text
    assert "HTTP 401" in text and "req_1" in text and "1 image(s) made before the failure" in text
    assert error.files == [image]


def test_import_is_light() -> None:
    code = "import sys, nbimagine, nbimagine.config, nbimagine.tools, nbimagine.events; " \
           "heavy = [m for m in ('openai', 'google.genai', 'PIL', 'IPython', 'ipywidgets') if m in sys.modules]; " \
           "print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("message", "request_id"), [
    ("The background response resp_1 was cancelled on the server before it finished", None),
    ("The connection dropped mid-answer; run it again.", None),
    ("Image generation failed", "req_1"),
])
def test_the_kept_images_are_a_sentence_of_their_own(message: str, request_id: str | None) -> None:
    from nbimagine.errors import ProviderError

    error = ProviderError(message, provider="openai", request_id=request_id, files=[BinaryResult(b"x")])
    text = str(error)
    assert text.endswith(". 1 image(s) made before the failure are in .files.") and ".. " not in text
