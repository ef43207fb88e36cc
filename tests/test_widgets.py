"""Model tests of the widget panels, without a browser.

ipywidgets work in plain Python (a dummy comm; ``observe`` fires; ``Button.click()`` runs the
handlers), so every control, rule and binding is driven here for real: a real
:class:`ImagineSession`, a real history in a temporary folder, and generations that go over HTTP
to the real emulator through the real SDKs.
"""

from __future__ import annotations

import asyncio
import html
import re
import threading

import pytest

from nbimagine._session import ImagineSession, get_session, set_emulator
from nbimagine._widgets import CUSTOM, DEFAULT, ProviderPanel, Studio, panel
from nbimagine.config import AzureOpenAIResponsesConfig

# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def session() -> ImagineSession:
    return ImagineSession()


def text(widget) -> str:
    """An HTML widget's visible text."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", widget.value)).split())


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
        "OpenAI", "OpenAI Images API", "Azure OpenAI", "Azure OpenAI Images API", "Microsoft Foundry agent", "Gemini",
        "Vertex AI"]
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


@pytest.mark.parametrize(("name", "typed", "fragment"), [
    ("project_endpoint", "https://res.services.ai.azure.com", "ends with /api/projects/<project>"),
    ("project_endpoint", "http://res.services.ai.azure.com/api/projects/p", "must use https"),
    ("agent_name", "my_agent!", "letters, digits and hyphens"),
])
def test_free_text_being_typed_stays_and_says_it_is_not_applied_yet(session, name, typed, fragment):
    p = ProviderPanel(session)
    p.provider.value = "foundry"
    p.quality.value = "low"
    getattr(p, name).value = typed
    # The text stays where the user is typing (never wiped), the session keeps what is in effect.
    assert getattr(p, name).value == typed and getattr(session, name) is None
    message = text(p.errors[name])
    assert "is not applied yet" in message and fragment in message and "in effect: default" in message
    assert session.quality == "low"  # the rest of the panel still applies
    # A refusal elsewhere (a transparent JPEG) puts that control back, not the text being typed.
    p.output_format.value = "jpeg"
    p.background.value = "transparent"
    assert p.background.value == DEFAULT and getattr(p, name).value == typed
    good = {"project_endpoint": "https://res.services.ai.azure.com/api/projects/p", "agent_name": "painter"}[name]
    getattr(p, name).value = good
    assert getattr(session, name) == good and text(p.errors[name]) == ""
