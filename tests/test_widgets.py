"""Model tests of the widget panels, without a browser.

ipywidgets work in plain Python (a dummy comm; ``observe`` fires; ``Button.click()`` runs the
handlers), so every control, rule and binding is driven here for real: a real
:class:`ImagineSession`, a real history in a temporary folder, and generations that go over HTTP
to the real emulator through the real SDKs.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import io
import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from nbimagine._history import History
from nbimagine._session import ImagineSession, get_session, set_emulator
from nbimagine._widgets import CUSTOM, DEFAULT, ProviderPanel, Studio, panel, plain_error, studio
from nbimagine.config import AzureOpenAIResponsesConfig
from nbimagine.errors import ConfigError, ContentPolicyError, ProviderError
from nbimagine.events import BinaryResult

# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def session() -> ImagineSession:
    return ImagineSession()


@pytest.fixture
def routed(emu):
    """A session answered by the shared test emulator."""
    set_emulator(emu)
    yield ImagineSession(emulator=True)
    set_emulator(None)


@pytest.fixture
def hist(tmp_path) -> History:
    return History(tmp_path, "widgets")


def png(i: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    colour = (i % 256, (i // 256) % 256, 120) if mode == "RGB" else (i % 256, 30, 90, 128)
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def seed(history: History, count: int) -> list[int]:
    with history.batch():
        return [history.add(BinaryResult(png(i)), prompt=f"seed image {i}", provider="openai",
                            model="gpt-image-1").id for i in range(count)]


def text(widget) -> str:
    """An HTML widget's visible text."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", widget.value)).split())


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# === Provider panel ================================================================================


def test_panel_factory_uses_the_shared_session():
    p = panel()
    try:
        assert p.session is get_session()
        assert "application/vnd.jupyter.widget-view+json" in p._repr_mimebundle_()
    finally:
        p.close()


def test_provider_dropdown_lists_every_provider_and_the_emulator(session):
    p = ProviderPanel(session)
    assert [label for label, _ in p.provider.options] == [
        "OpenAI", "Azure OpenAI", "Microsoft Foundry agent", "Gemini", "Vertex AI"]
    assert p.provider.value == "openai"
    p.emulator.value = True
    assert session.emulator is True
    p.emulator.value = False
    assert session.emulator is False


def test_panel_opens_with_the_session_values(session):
    session.use("openai", model="gpt-5", quality="high", size="2048x1152", background="opaque",
                output_format="webp", output_compression=35, partial_images=2, moderation="low",
                input_fidelity="high", aspect_ratio="16:9", image_size="2K", any_provider=True)
    p = ProviderPanel(session)
    assert (p.provider.value, p.model.value, p.quality.value) == ("openai", "gpt-5", "high")
    assert (p.size.value, p.custom_size.value) == (CUSTOM, "2048x1152")
    assert (p.background.value, p.output_format.value) == ("opaque", "webp")
    assert (p.compression_on.value, p.compression.value) == (True, 35)
    assert (p.partial_images.value, p.moderation.value, p.input_fidelity.value) == (2, "low", "high")
    assert (p.aspect_ratio.value, p.image_size.value) == ("16:9", "2K")
    assert p.wanted() == {"provider": "openai", "emulator": False, **session.active_options()}
    assert "Kept for Gemini, not used with OpenAI: aspect_ratio=16:9, image_size=2K" in text(p.inactive)


@pytest.mark.parametrize("provider, openai_shown", [("openai", True), ("azure", True), ("gemini", False),
                                                    ("vertex", False)])
def test_only_the_chosen_providers_controls_are_shown(session, provider, openai_shown):
    p = ProviderPanel(session)
    p.provider.value = provider
    assert session.provider == provider
    assert (p.openai_box.layout.display != "none") is openai_shown
    assert (p.gemini_box.layout.display != "none") is not openai_shown


@pytest.mark.parametrize("control, value, trait, expected", [
    ("quality", "low", "quality", "low"),
    ("quality", "max", "quality", "max"),
    ("size", "1536x1024", "size", "1536x1024"),
    ("size", "auto", "size", "auto"),
    ("background", "transparent", "background", "transparent"),
    ("output_format", "webp", "output_format", "webp"),
    ("partial_images", 3, "partial_images", 3),
    ("moderation", "low", "moderation", "low"),
    ("input_fidelity", "high", "input_fidelity", "high"),
    ("model", "gpt-5", "model", "gpt-5"),
    ("model", "  gpt-5  ", "model", "gpt-5"),
])
def test_each_openai_control_writes_the_session(session, control, value, trait, expected):
    p = ProviderPanel(session)
    getattr(p, control).value = value
    assert getattr(session, trait) == expected
    assert not any(box.value for box in p.errors.values() if "nbi-error-text" in box.value)


@pytest.mark.parametrize("control, value, trait", [
    ("aspect_ratio", "21:9", "aspect_ratio"), ("image_size", "4K", "image_size")])
def test_each_gemini_control_writes_the_session(session, control, value, trait):
    p = ProviderPanel(session)
    p.provider.value = "gemini"
    getattr(p, control).value = value
    assert getattr(session, trait) == value
    getattr(p, control).value = DEFAULT
    assert getattr(session, trait) is None


def test_partial_images_slider_cannot_leave_0_to_3(session):
    p = ProviderPanel(session)
    assert (p.partial_images.min, p.partial_images.max) == (0, 3)
    p.partial_images.value = 7  # the slider clamps: an invalid count cannot be entered
    assert session.partial_images == 3


def test_the_default_choice_sends_nothing(session):
    p = ProviderPanel(session)
    p.quality.value = "high"
    p.quality.value = DEFAULT
    assert session.quality is None
    tool = session.build_agent().tools[0]
    assert "quality" not in tool.params()


def test_custom_size_valid_and_invalid(session):
    p = ProviderPanel(session)
    assert p.custom_size.layout.display == "none" and p.custom_size.disabled
    p.size.value = "1024x1024"
    p.size.value = CUSTOM
    assert p.custom_size.layout.display != "none" and not p.custom_size.disabled
    assert "type a size such as 2048x1152; the size in effect is 1024x1024" in text(p.errors["size"])
    assert session.size == "1024x1024"  # nothing applied until a valid size is typed
    p.custom_size.value = "1000x3200"
    reason = text(p.errors["size"])
    assert "multiples of 16" in reason and "3 times" in reason
    assert session.size == "1024x1024"
    p.quality.value = "high"  # the rest still applies while the size is flagged
    assert session.quality == "high" and session.size == "1024x1024"
    assert "multiples of 16" in text(p.errors["size"])
    p.custom_size.value = "2048x1152"
    assert session.size == "2048x1152"
    assert p.errors["size"].value == ""


def test_compression_only_for_jpeg_and_webp(session):
    p = ProviderPanel(session)
    assert p.compression_on.disabled and p.compression.disabled
    p.output_format.value = "png"
    assert p.compression_on.disabled and p.compression.disabled
    p.output_format.value = "jpeg"
    assert not p.compression_on.disabled and p.compression.disabled  # enabled by the checkbox
    p.compression_on.value = True
    assert not p.compression.disabled and session.output_compression == 80
    p.compression.value = 40
    assert session.output_compression == 40
    p.output_format.value = "png"  # compression cannot stay on for PNG
    assert p.compression.disabled and p.compression_on.disabled
    assert session.output_format == "png" and session.output_compression is None
    assert "jpeg and webp only" in text(p.errors["output_compression"])  # a note, not an error
    session.build_agent()
    p.output_format.value = "webp"
    assert session.output_compression == 40 and p.errors["output_compression"].value == ""
    assert session.build_agent().tools[0].params()["output_compression"] == 40


def test_transparent_jpeg_is_flagged_and_not_applied(session):
    p = ProviderPanel(session)
    p.background.value = "transparent"
    assert session.background == "transparent"
    p.output_format.value = "jpeg"
    assert "JPEG has no transparency" in text(p.errors["output_format"])
    assert "output format stays default" in text(p.errors["output_format"])
    assert session.output_format is None and session.background == "transparent"
    assert p.output_format.value == DEFAULT  # put back: the panel never shows a value not in effect
    session.build_agent()  # the session never held the invalid pair
    p.background.value = DEFAULT
    p.output_format.value = "jpeg"
    assert session.output_format == "jpeg" and p.errors["output_format"].value == ""
    p.background.value = "transparent"  # the same pair, reached from the other side
    assert "background stays default" in text(p.errors["output_format"])
    assert (session.output_format, session.background, p.background.value) == ("jpeg", None, DEFAULT)
    p.output_format.value = "webp"
    p.background.value = "transparent"
    assert (session.output_format, session.background) == ("webp", "transparent")
    assert p.errors["output_format"].value == ""


def test_response_modalities(session):
    p = ProviderPanel(session)
    p.provider.value = "gemini"
    assert [m for m, box in p.modalities.items() if box.value] == ["TEXT", "IMAGE"]
    p.modalities["TEXT"].value = False
    assert session.response_modalities == ["IMAGE"]
    p.modalities["IMAGE"].value = False  # refused, and put back: the panel shows what is in effect
    assert "at least one" in text(p.errors["response_modalities"])
    assert session.response_modalities == ["IMAGE"] and p.modalities["IMAGE"].value is True
    p.modalities["TEXT"].value = True
    p.modalities["IMAGE"].value = False
    assert session.response_modalities == ["TEXT"]
    assert "text only" in text(p.errors["response_modalities"])  # a warning: allowed, but explained
    p.modalities["IMAGE"].value = True
    assert session.response_modalities == ["TEXT", "IMAGE"] and p.errors["response_modalities"].value == ""


def test_newest_only_gemini_values_are_explained_for_older_models(session):
    p = ProviderPanel(session)
    p.provider.value = "gemini"
    p.aspect_ratio.value = "4:1"
    assert p.errors["aspect_ratio"].value == ""  # the default model supports it
    p.model.value = "gemini-2.5-flash-image"
    assert "Gemini 3.1 Flash Image only" in text(p.errors["aspect_ratio"])
    assert session.aspect_ratio == "4:1"  # a warning only: the provider decides


def test_switching_provider_resets_the_model_and_placeholder(session):
    p = ProviderPanel(session)
    p.model.value = "gpt-5"
    assert session.model == "gpt-5"
    p.provider.value = "gemini"
    assert p.model.value == "" and session.model is None
    assert session.effective_model() == p.model.placeholder == "gemini-3.1-flash-image"
    p.provider.value = "openai"
    assert p.model.placeholder == "gpt-4.1"


def test_session_changes_update_an_open_panel(session):
    p = ProviderPanel(session)
    p.custom_size.value = "garbage"  # a pending invalid entry ...
    session.use("gemini", aspect_ratio="9:16", image_size="1K", response_modalities=["IMAGE"])
    assert p.provider.value == "gemini" and p.gemini_box.layout.display != "none"
    assert (p.aspect_ratio.value, p.image_size.value) == ("9:16", "1K")
    assert [m for m, box in p.modalities.items() if box.value] == ["IMAGE"]
    session.use("openai", size="2048x1152", output_format="jpeg", output_compression=55, emulator=True)
    assert p.openai_box.layout.display != "none" and p.emulator.value
    assert (p.size.value, p.custom_size.value) == (CUSTOM, "2048x1152")
    assert (p.compression_on.value, p.compression.value, p.compression.disabled) == (True, 55, False)
    session.use(size=None)
    assert p.size.value == DEFAULT and p.custom_size.layout.display == "none"
    assert p.errors["size"].value == ""  # ... is replaced by the session's valid value


def test_two_panels_follow_each_other(session):
    a, b = ProviderPanel(session), ProviderPanel(session)
    a.quality.value = "medium"
    assert b.quality.value == "medium"
    b.provider.value = "vertex"
    assert a.provider.value == "vertex" and a.gemini_box.layout.display != "none"


def test_session_changes_from_another_thread_reach_the_panel_on_its_thread(session):
    main = threading.get_ident()
    seen: list[int] = []

    async def scenario() -> ProviderPanel:
        p = ProviderPanel(session)
        p.quality.observe(lambda ch: seen.append(threading.get_ident()), names="value")
        worker = threading.Thread(target=session.use, kwargs={"quality": "high"})
        worker.start()
        worker.join()
        for _ in range(200):
            if p.quality.value == "high":
                break
            await asyncio.sleep(0.01)
        return p

    p = asyncio.run(scenario())
    assert p.quality.value == "high" and seen == [main]


def test_closed_panel_stops_following(session):
    p = ProviderPanel(session)
    p.close()
    session.use(quality="high")
    assert p.quality.value == DEFAULT


def test_key_status_shows_set_or_not_never_the_value(session, monkeypatch):
    secret = "sk-proj-panel-test-secret-0123456789"
    p = ProviderPanel(session)
    assert "OpenAI: ○ not set" in text(p.keys)
    assert "OPENAI_API_KEY" in text(p.keys)  # the hint names the variable to set
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "my-project-name")
    p.refresh_keys.click()
    shown = text(p.keys)
    assert "OpenAI: ● set" in shown and "Vertex AI: ● set" in shown
    assert "Gemini: ○ not set" in shown and "Azure OpenAI: ○ not set" in shown
    assert secret not in p.keys.value and "my-project-name" not in p.keys.value
    p.provider.value = "gemini"
    assert "GEMINI_API_KEY or GOOGLE_API_KEY" in text(p.keys)
    p.emulator.value = True
    assert "no key is needed" in text(p.keys)
    assert all(secret not in str(w.get_state()) for w in [*p._inputs(), p.keys])


def test_registered_provider_is_offered(session):
    session.register("azure_east", AzureOpenAIResponsesConfig(model="image-deployment-east"))
    p = ProviderPanel(session)
    assert ("azure_east (Azure OpenAI)", "azure_east") in p.provider.options
    p.provider.value = "azure_east"
    assert session.provider == "azure_east" and p.openai_box.layout.display != "none"
    assert p.model.placeholder == "image-deployment-east"


def test_a_session_rule_the_panel_does_not_know_is_shown_inline(session):
    p = ProviderPanel(session)
    session.register("custom", AzureOpenAIResponsesConfig(model="x"))
    p.provider.options = [*p.provider.options, ("custom", "custom")]
    p.provider.value = "custom"
    assert session.provider == "custom"
    session._registered.clear()  # the name disappears: the session refuses it, the panel says why
    p.quality.value = "low"
    assert "Unknown provider 'custom'" in text(p.errors["apply"])
    assert session.quality is None


# --- the magics and the panel share one session -----------------------------------------------------


@pytest.fixture
def shell(emu, tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    if "imagine" not in ip.magics_manager.magics["cell"]:
        ip.run_line_magic("load_ext", "nbimagine")
    s = get_session()
    defaults = {name: trait.default() for name, trait in s.traits().items() if not name.startswith("_")}
    s.use("openai", **{k: v for k, v in defaults.items() if k not in ("provider",)})
    set_emulator(emu)
    s.use(emulator=True)
    yield ip
    s.use("openai", **{k: v for k, v in defaults.items() if k not in ("provider",)})
    set_emulator(None)


def test_imagine_use_updates_an_open_panel(shell):
    p = shell.run_line_magic("imagine", "panel")
    assert isinstance(p, ProviderPanel) and p.session is get_session()
    shell.run_line_magic("imagine", "use gemini --aspect 16:9 --image-size 2K")
    assert (p.provider.value, p.aspect_ratio.value, p.image_size.value) == ("gemini", "16:9", "2K")
    assert p.gemini_box.layout.display != "none" and p.openai_box.layout.display == "none"
    shell.run_line_magic("imagine", "use openai --quality high --format jpeg --compression 30")
    assert (p.quality.value, p.output_format.value, p.compression.value) == ("high", "jpeg", 30)
    p.close()


def test_a_panel_change_is_the_default_of_the_next_imagine(shell, emu):
    p = shell.run_line_magic("imagine", "panel")
    p.size.value = "1536x1024"
    p.quality.value = "low"
    p.output_format.value = "jpeg"
    shell.run_cell_magic("imagine", "-o reply", "a lighthouse")
    image = shell.user_ns["reply"].files[0]
    assert (image.width, image.height, image.media_type) == (1536, 1024, "image/jpeg")
    tool = [r for r in emu.requests if r.method == "POST"][-1].json["tools"][0]
    assert (tool["size"], tool["quality"], tool["output_format"]) == ("1536x1024", "low", "jpeg")
    p.close()


def test_studio_magic_returns_a_studio(shell):
    st = shell.run_line_magic("imagine", "studio")
    assert isinstance(st, Studio) and st.session is get_session()
    st.close()


# === Studio ========================================================================================


def test_studio_factory_and_display(routed, hist):
    st = studio(routed, hist, settings=False)
    assert st.settings is None
    assert "application/vnd.jupyter.widget-view+json" in st._repr_mimebundle_()
    st.close()


def test_generate_shows_progress_then_result_caption_and_gallery(routed, hist, emu):
    emu.latency = 0.6
    st = Studio(routed, hist)
    assert text(st.gallery_title).strip() == "History (0 images)" and st.generate.disabled is False
    st.prompt.value = "a blue whale"
    st.generate.click()
    assert st.running and st.generate.disabled and not st.cancel.disabled
    wait_for(lambda: "0.4 s" in text(st.status) or "0.5 s" in text(st.status), 5)  # elapsed ticks
    assert "Generating" in text(st.status)
    assert st.wait(15)
    assert not st.generate.disabled and st.cancel.disabled
    assert "Done in" in text(st.status) and st.error.value == ""
    entry = hist.get(1)
    assert entry.prompt == "a blue whale"
    caption = text(st.caption)
    assert "#1" in caption and "openai/gpt-4.1" in caption and "1024x1024" in caption
    assert "PNG" in caption and "a blue whale" in caption
    shown = Image.open(io.BytesIO(st.result.value))
    assert shown.size == (768, 768) and st.result.layout.display != "none"
    assert text(st.gallery_title).strip() == "History (1 image)"
    assert st.tiles[0].select.description == "#1" and st.tiles[0].box.layout.display != "none"
    assert st.tiles[1].box.layout.display == "none"
    assert "a blue whale" in st.tiles[0].label.value
    st.close()


def test_generate_uses_the_session_settings_from_the_embedded_panel(routed, hist, emu):
    st = Studio(routed, hist)
    st.settings.provider.value = "gemini"
    st.settings.aspect_ratio.value = "16:9"
    assert "Gemini" in text(st.summary) and "aspect_ratio=16:9" in text(st.summary)
    st.prompt.value = "a wide valley"
    st.generate.click()
    assert st.wait(15)
    entry = hist.get(1)
    assert entry.provider == "gemini" and entry.params == {"aspect_ratio": "16:9"}
    assert entry.width > entry.height
    assert "gemini/" in text(st.caption)
    st.close()


def test_partial_images_are_shown_while_running(routed, hist, emu):
    routed.use(partial_images=2)
    emu.stream_delay = 0.15
    st = Studio(routed, hist, settings=False)
    partials: list[bytes] = []
    st.partial.observe(lambda ch: partials.append(ch["new"]) if ch["new"] else None, names="value")
    st.prompt.value = "a lighthouse"
    st.generate.click()
    wait_for(lambda: st.partial.layout.display != "none", 10)
    assert "partial image" in text(st.caption)
    assert st.wait(15)
    assert len(partials) == 2 and all(Image.open(io.BytesIO(b)).size[0] <= 384 for b in partials)
    assert st.partial.layout.display == "none" and st.partial.value == b""
    assert "#1" in text(st.caption)
    st.close()


def test_empty_prompt_is_refused_in_plain_words(routed, hist):
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "   "
    st.generate.click()
    assert "Write a prompt first" in text(st.error)
    assert not st.running and not st.generate.disabled and len(hist) == 0
    st.close()


def test_provider_error_is_shown_and_the_studio_stays_usable(routed, hist):
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "a cat [error:500]"
    st.generate.click()
    assert st.wait(30)
    message = text(st.error)
    assert message.strip().startswith("⚠ The provider could not make the image")
    assert "HTTP 500" in message and "Traceback" not in message
    assert "Failed after" in text(st.status) and not st.generate.disabled and len(hist) == 0
    st.prompt.value = "a cat"
    st.generate.click()
    assert st.wait(15)
    assert st.error.value == "" and len(hist) == 1 and "Done in" in text(st.status)
    st.close()


def test_content_policy_refusal_is_explained(routed, hist):
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "something [fault:moderation]"
    st.generate.click()
    assert st.wait(15)
    assert "safety system refused" in text(st.error)
    assert not st.generate.disabled
    st.close()


def test_missing_key_is_explained_without_a_request(hist, emu):
    s = ImagineSession()  # no emulator, no keys (conftest removes them)
    st = Studio(s, hist, settings=False)
    st.prompt.value = "a cat"
    st.generate.click()
    assert st.wait(15)
    assert "OPENAI_API_KEY" in text(st.error) and "getpass" in text(st.error)
    assert not st.generate.disabled and emu.requests == []
    st.close()


def test_invalid_settings_are_refused_before_starting(hist, routed):
    st = Studio(routed, hist)
    routed.provider = "nonexistent"  # set directly, bypassing use(): the studio must still cope
    assert st.settings is not None and st.settings.provider.value == "nonexistent"
    assert "Unknown provider" in text(st.summary)
    st.prompt.value = "a cat"
    st.generate.click()
    assert "Settings problem" in text(st.error) and "Unknown provider" in text(st.error)
    assert not st.running and not st.generate.disabled
    routed.provider = "openai"
    st.close()


def test_cancel_stops_the_request(routed, hist, emu):
    emu.latency = 20
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "a slow painting"
    st.generate.click()
    wait_for(lambda: any(r.method == "POST" for r in emu.requests), 10)
    started = time.monotonic()
    st.cancel.click()
    assert st.wait(10)
    assert time.monotonic() - started < 6
    assert "Cancelled after" in text(st.status)
    assert not st.generate.disabled and st.cancel.disabled and len(hist) == 0
    wait_for(lambda: emu.state.aborted >= 1, 5)  # the emulator saw the client go away
    st.close()


def test_generate_is_ignored_while_running(routed, hist, emu):
    emu.latency = 0.5
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "one image"
    first = st.start()
    assert first is not None and st.start() is None  # a second click (e.g. a stale browser view)
    assert st.wait(15)
    assert len(hist) == 1
    st.close()


def test_edit_selected_sends_the_selection_and_records_lineage(routed, hist, emu):
    st = Studio(routed, hist, settings=False)
    assert st.edit.disabled
    st.prompt.value = "a red fox"
    st.generate.click()
    assert st.wait(15)
    st.prompt.value = "a grey wolf"
    st.generate.click()
    assert st.wait(15)
    assert [t.select.description for t in st.tiles[:2]] == ["#2", "#1"]
    st.tiles[1].select.value = True  # #1
    st.tiles[0].select.value = True  # #2
    assert st.selected == [1, 2] and text(st.selection_label) == "selected: #1, #2"
    assert not st.edit.disabled and st.edit.description == "Edit selected (2)"
    emu.requests.clear()
    st.prompt.value = "put them in one picture"
    st.edit.click()
    assert st.wait(15)
    body = [r for r in emu.requests if r.method == "POST"][-1].json
    content = body["input"][-1]["content"]
    images = [part for part in content if part.get("type") == "input_image"]
    assert len(images) == 2 and any(part.get("text") == "put them in one picture" for part in content)
    entry = hist.get(3)
    assert entry.parents == (1, 2)
    assert [e.id for e in hist.lineage(3)] == [1, 2, 3]
    assert "edited from #1, #2" in text(st.caption)
    st.close()


def test_edit_without_a_selection_is_refused(routed, hist):
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "make it blue"
    assert st.start(edit=True) is None
    assert "Select one or more images" in text(st.error)
    st.close()


def test_gallery_pages_and_clamps(routed, hist):
    seed(hist, 60)
    st = Studio(routed, hist, per_page=24, settings=False)
    ids = lambda: [t.entry_id for t in st.tiles if t.box.layout.display != "none"]  # noqa: E731
    assert ids() == list(range(60, 36, -1)) and st.page_label.value == "page 1 of 3"
    assert st.prev_page.disabled and not st.next_page.disabled
    st.next_page.click()
    assert ids() == list(range(36, 12, -1)) and st.page_label.value == "page 2 of 3"
    st.next_page.click()
    assert ids() == list(range(12, 0, -1)) and st.next_page.disabled
    assert sum(t.box.layout.display == "none" for t in st.tiles) == 12
    st.show_page(99)
    assert st.page == 2
    st.prev_page.click()
    assert st.page == 1 and not st.prev_page.disabled
    tile = st.tiles[0]
    thumb = Image.open(io.BytesIO(tile.image.value))
    assert max(thumb.size) <= 192 and tile.image.format == "jpeg"
    assert "seed image 35" in tile.label.value and tile.select.description == "#36"
    st.close()


def test_a_missing_image_file_does_not_break_the_gallery(routed, hist):
    ids = seed(hist, 2)
    hist.get(ids[0]).path.unlink()  # deleted by hand, or by another tool
    s = studio(routed, hist)
    tiles = {t.entry_id: t for t in s.tiles if t.entry_id is not None}
    assert set(tiles) == set(ids)
    assert tiles[ids[1]].image.value and not tiles[ids[0]].image.value
    assert "missing" in tiles[ids[0]].label.value


def test_transparent_images_get_png_thumbnails(routed, hist):
    hist.add(BinaryResult(png(1, mode="RGBA")), prompt="glass")
    st = Studio(routed, hist, settings=False)
    assert st.tiles[0].image.format == "png"
    st.close()


def test_selection_survives_paging_and_can_be_cleared(routed, hist):
    seed(hist, 30)
    st = Studio(routed, hist, per_page=10, settings=False)
    st.tiles[0].select.value = True  # #30
    st.next_page.click()
    st.tiles[2].select.value = True  # #18
    assert st.selected == [30, 18]
    st.prev_page.click()
    assert st.tiles[0].select.value is True and st.tiles[0].select.button_style == "info"
    assert st.tiles[1].select.value is False
    st.tiles[0].select.value = False
    assert st.selected == [18]
    st.clear_selection.click()
    assert st.selected == [] and st.edit.disabled and st.clear_selection.disabled
    assert not any(t.select.value for t in st.tiles)
    assert text(st.selection_label) == "nothing selected"
    st.close()


def test_gallery_picks_up_images_made_elsewhere(routed, hist):
    st = Studio(routed, hist, settings=False)
    seed(hist, 3)
    assert "(0 images)" in text(st.gallery_title)
    st.refresh.click()
    assert "(3 images)" in text(st.gallery_title) and st.tiles[0].entry_id == 3
    st.close()


def test_a_history_of_1000_opens_at_once(routed, hist):
    seed(hist, 1000)
    for entry in hist.page(0, 24):
        entry.thumbnail(192)  # cached, as after any earlier display
    st = Studio(routed, hist, settings=False)  # how fast: benchmarks/bench_widgets.py (no clock in tests)
    assert [t.entry_id for t in st.tiles] == list(range(1000, 976, -1))
    assert st.page_label.value == "page 1 of 42"
    st.close()


def test_save_writes_the_full_image(routed, hist, tmp_path):
    big = BinaryResult(png(7, size=(1200, 900)))
    hist.add(big, prompt="full size")
    st = Studio(routed, hist, settings=False)
    st.tiles[0].select.value = True
    st.save_path.value = str(tmp_path / "out" / "full.png")
    st.save.click()
    saved = tmp_path / "out" / "full.png"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == big.sha256  # not the thumbnail
    assert f"Saved #1 to {saved}" in text(st.status)
    written = st.save_selected(str(tmp_path / "out" / "full.jpg"))
    assert Image.open(written[0]).format == "JPEG" and Image.open(written[0]).size == (1200, 900)
    st.close()


def test_save_rules(routed, hist, tmp_path):
    st = Studio(routed, hist, settings=False)
    st.save.click()
    assert "Nothing to save" in text(st.error)
    seed(hist, 2)
    st.refresh.click()
    st.tiles[0].select.value = True
    st.save_path.value = ""
    st.save.click()
    assert "Type where to save" in text(st.error)
    st.tiles[1].select.value = True
    st.save_path.value = str(tmp_path / "one.png")
    st.save.click()
    assert "give a folder" in text(st.error) and not (tmp_path / "one.png").exists()
    st.save_path.value = str(tmp_path / "both") + "/"
    st.save.click()
    assert sorted(p.suffix for p in (tmp_path / "both").iterdir()) == [".png", ".png"]
    assert st.error.value == ""
    (tmp_path / "blocker").write_text("a file, not a folder")
    st.save_path.value = str(tmp_path / "blocker" / "x") + "/"
    st.save.click()
    assert "File problem" in text(st.error)
    st.close()


def test_save_without_selection_uses_the_last_result(routed, hist, tmp_path):
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "a teapot"
    st.generate.click()
    assert st.wait(15)
    paths = st.save_selected(str(tmp_path / "teapot"))
    assert paths == [tmp_path / "teapot.png"] and paths[0].read_bytes() == hist.get(1).path.read_bytes()
    st.close()


def test_summary_follows_the_session(routed, hist):
    st = Studio(routed, hist, settings=False)
    assert "OpenAI · gpt-4.1" in text(st.summary) and "offline emulator" in text(st.summary)
    routed.use("vertex", image_size="2K")
    assert "Vertex AI · gemini-3.1-flash-image" in text(st.summary) and "image_size=2K" in text(st.summary)
    st.close()
    routed.use("openai")
    assert "Vertex AI" in text(st.summary)  # closed: no longer follows


def test_background_updates_run_on_the_studio_thread(routed, hist, emu):
    """Inside a running loop (as in a kernel) every widget change is made on the loop's own thread."""
    routed.use(partial_images=2)
    emu.stream_delay = 0.1
    main = threading.get_ident()
    changes: list[tuple[str, int]] = []

    async def scenario() -> Studio:
        st = Studio(routed, hist, settings=False)
        watched = {"status": st.status, "partial": st.partial, "result": st.result, "caption": st.caption,
                   "gallery": st.gallery_title, "tile": st.tiles[0].image}
        for name, widget in watched.items():
            widget.observe(lambda ch, name=name: changes.append((name, threading.get_ident())), names="value")
        st.generate.observe(lambda ch: changes.append(("generate", threading.get_ident())), names="disabled")
        st.prompt.value = "a harbour at night"
        st.generate.click()
        while st.running:
            await asyncio.sleep(0.02)
        return st

    st = asyncio.run(scenario())
    names = {name for name, _ in changes}
    assert {"status", "partial", "result", "caption", "gallery", "tile", "generate"} <= names
    off_thread = [(name, ident) for name, ident in changes if ident != main]
    assert off_thread == []
    assert "Done in" in text(st.status)
    st.close()


def test_without_a_loop_updates_are_applied_under_the_lock(routed, hist, emu):
    routed.use(partial_images=1)
    st = Studio(routed, hist, settings=False)
    held: list[bool] = []

    def probe(ch):
        # RLock._is_owned: the thread making the change holds the studio's lock.
        held.append(st._lock._is_owned())

    st.partial.observe(probe, names="value")
    st.result.observe(probe, names="value")
    st.prompt.value = "a kite"
    st.generate.click()
    assert st.wait(15)
    assert held and all(held)
    st.close()


def test_plain_error_wording():
    assert plain_error(ConfigError("bad size")) == "Settings problem: bad size"
    assert "safety system refused this request (sexual)" in plain_error(
        ContentPolicyError("blocked", reason="sexual"))
    assert plain_error(ProviderError("boom", provider="openai", status=502)).startswith(
        "The provider could not make the image: [openai, HTTP 502] boom")
    assert "key *** leaked" in plain_error(RuntimeError("key sk-abcdefghijklmnop leaked"))
    assert "abcdefghijklmnop" not in plain_error(RuntimeError("key sk-abcdefghijklmnop leaked"))
    assert plain_error(KeyError("no image #9")) == "no image #9"
    assert plain_error(OSError("disk full")).startswith("File problem")


def test_import_nbimagine_stays_light():
    import subprocess
    import sys

    code = ("import sys, nbimagine; assert 'ipywidgets' not in sys.modules; "
            "assert 'nbimagine._widgets' not in sys.modules; nbimagine.panel; "
            "assert 'ipywidgets' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_files_are_only_where_expected(hist, tmp_path):
    # The studio never writes next to the notebook except through the history and Save.
    before = set(Path(tmp_path).rglob("*"))
    st = Studio(ImagineSession(), hist, settings=False)
    st.close()
    assert set(Path(tmp_path).rglob("*")) == before


def test_the_studio_shows_images_the_history_could_not_record(routed, hist):
    import shutil

    shutil.rmtree(hist.path / "images", ignore_errors=True)
    (hist.path / "images").write_bytes(b"not a folder")  # every image write fails, even as root
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "a kite"
    st.generate.click()
    assert st.wait(30)
    assert "Done in" in text(st.status) and len(hist) == 0
    assert "could not be recorded in the history" in text(st.error)
    assert st.result.value and "a kite" in text(st.caption)
    st.close()


def test_the_studio_names_an_image_it_cannot_preview(routed, hist):
    st = Studio(routed, hist, settings=False)
    st.prompt.value = "a kite [fault:truncated_png]"
    st.generate.click()
    assert st.wait(30)
    assert "Done in" in text(st.status) and len(hist) == 1
    assert "No preview" in text(st.error) and "truncated" in text(st.error)
    assert f"#{hist[-1].id}" in text(st.caption) and "PNG" in text(st.caption)
    st.close()


# --- Microsoft Foundry controls ----------------------------------------------------------------------


def test_foundry_controls_show_for_foundry_and_write_the_session(session):
    p = ProviderPanel(session)
    p.provider.value = "foundry"
    deployment = p.family_boxes[("azure", "foundry")]  # the image deployment: Azure's and Foundry's
    assert p.foundry_box.layout.display != "none" and p.openai_box.layout.display != "none"
    assert deployment.layout.display != "none" and p.gemini_box.layout.display == "none"
    p.project_endpoint.value = "https://res.services.ai.azure.com/api/projects/p"
    p.agent_name.value = "painter"
    p.image_deployment.value = "gpt-image-1"
    assert (session.project_endpoint, session.agent_name, session.image_deployment) == (
        "https://res.services.ai.azure.com/api/projects/p", "painter", "gpt-image-1")
    session.use(agent_version="3")
    assert p.agent_version.value == "3"
    assert "Microsoft Entra ID" in p.keys.value
    p.provider.value = "azure"
    assert p.foundry_box.layout.display == "none" and deployment.layout.display != "none"
    p.provider.value = "gemini"
    assert deployment.layout.display == "none"


def test_background_mode_checkbox_follows_the_session(session):
    p = ProviderPanel(session)
    p.background_mode.value = True
    assert session.background_mode is True
    session.use(background_mode=False)
    assert p.background_mode.value is False
