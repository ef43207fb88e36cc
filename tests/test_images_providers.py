"""The Images API as built-in providers, ``openai-images`` and ``azure-images``: ``%imagine use``, ``-p``,
``%imagine providers``, ``-h``, the panel and the studio know them from the one option table, through a
real ``InteractiveShell`` and the real ``openai`` SDK over HTTP against the emulator."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from test_magics import imagine  # the `ip` shell fixture is in conftest.py

from nbimagine._options import IMAGE_TOOL, IMAGES_API, options_for
from nbimagine._session import PROVIDERS, ImagineSession, get_session
from nbimagine._widgets import PROVIDER_LABELS, ProviderPanel
from nbimagine.config import AzureOpenAIImagesConfig, OpenAIImagesConfig

# name -> the route its generations take on the emulator
ROUTES = {"openai-images": "/v1/images/generations",
          "azure-images": "/openai/deployments/gpt-image-2/images/generations"}


def image_calls(emu) -> list:
    return [r for r in emu.requests if "/images/" in r.path]


@pytest.mark.parametrize("name", IMAGES_API)
def test_use_then_n_images_in_one_request_all_recorded(ip, emu, name) -> None:
    import nbimagine

    shown = repr(ip.run_line_magic("imagine", f"use {name} --size 1536x1024 --quality low"))
    assert f"imagine defaults: {name} · gpt-image-2" in shown
    imagine(ip, "-n 4 -o r", "four lighthouses")
    calls = image_calls(emu)
    assert len(calls) == 1 and calls[0].path == ROUTES[name]
    assert {k: calls[0].json[k] for k in ("n", "size", "quality")} == {"n": 4, "size": "1536x1024", "quality": "low"}
    reply = ip.user_ns["r"]
    assert len(reply.files) == 4 and len({f.sha256 for f in reply.files}) == 4
    entries = nbimagine.history().latest(4)
    assert [(e.model, e.params.get("n"), e.width, e.height) for e in entries] == [("gpt-image-2", 4, 1536, 1024)] * 4


def test_ten_images_is_the_images_api_limit_and_eight_the_others(ip, emu) -> None:
    imagine(ip, "-p openai-images -n 10 --no-history -o r", "ten moons")
    assert len(ip.user_ns["r"].files) == 10 and len(image_calls(emu)) == 1
    emu.reset()
    for line, limit in (("-p openai-images -n 11", 10), ("-p openai -n 9", 8), ("-p azure-images -n 0", 10)):
        with pytest.raises(UsageError, match=f"-n takes 1 to {limit} variants"):
            imagine(ip, line, "moons")
    assert emu.requests == []


def test_azure_images_uses_the_image_deployment(ip, emu, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_IMAGE_DEPLOYMENT", "team-images")  # the Responses config's variable too
    imagine(ip, "-p azure-images --no-history", "a fox")
    assert image_calls(emu)[-1].path == "/openai/deployments/team-images/images/generations"
    imagine(ip, "-p azure-images -m gpt-image-1.5 --no-history", "a fox")
    assert image_calls(emu)[-1].path == "/openai/deployments/gpt-image-1.5/images/generations"
    assert image_calls(emu)[-1].query == {"api-version": "2025-04-01-preview"}


# What the Images API does not take, or the model refuses: one line, naming the fix, before any request.
REFUSED = [
    ("-p openai-images --background-mode", "drop it, or use -p openai (the Responses API)"),
    ("-p azure-images --background-mode", "use -p azure (the Responses API)"),
    ("-p azure-images --image-deployment team-images", "the Images API's model is the image deployment: "
                                                       "use -m team-images"),
    ("-p openai-images --aspect 16:9", "for OpenAI Images API use --size 1536x1024"),
    ("-p azure-images --image-size 2K", "for Azure OpenAI Images API use --size"),
    ("-p openai-images --modalities IMAGE", "always answers with text and the image tool"),
    ("-p openai-images -m dall-e-3 --size 1536x1024", "dall-e-3 sizes are '1024x1024', '1792x1024', '1024x1792'"),
    ("-p openai-images -m dall-e-3 -n 2", "n must be an integer from 1 to 1 for dall-e-3"),
    ("-p openai-images -m dall-e-2 --quality high", "quality must be one of 'standard' for dall-e-2"),
    ("-p openai-images -m gpt-image-1-mini --fidelity high", "input_fidelity must be one of 'low'"),
    ("-p openai-images --quality xhigh", "quality must be one of 'low', 'medium', 'high', 'auto' for gpt-image-2"),
    ("-p openai-images --format jpeg --background transparent", "JPEG has no transparency"),
]


@pytest.mark.parametrize(("line", "message"), REFUSED, ids=[line for line, _ in REFUSED])
def test_what_the_images_api_does_not_take_is_refused_before_any_request(ip, emu, line, message) -> None:
    with pytest.raises(UsageError) as info:
        imagine(ip, line, "a fox")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert emu.requests == []
    if " -n " not in line:  # -n belongs to one cell; the rest are refused as session defaults too
        before = get_session().options()
        with pytest.raises(UsageError) as info:
            ip.run_line_magic("imagine", f"use {line.removeprefix('-p ')}")
        assert message in str(info.value)
        assert get_session().options() == before


def test_the_equivalents_named_are_accepted(ip, emu) -> None:
    imagine(ip, "-p openai-images --size 1536x1024 --no-history -o r", "a fox")
    assert (ip.user_ns["r"].files[0].width, ip.user_ns["r"].files[0].height) == (1536, 1024)
    imagine(ip, "-p azure-images -m team-images --no-history", "a fox")
    assert image_calls(emu)[-1].path == "/openai/deployments/team-images/images/generations"
    imagine(ip, "-p openai --background-mode --no-history", "a fox")  # the Responses API's background mode


def test_providers_help_and_traits_name_them(ip, capsys, monkeypatch) -> None:
    ip.run_line_magic("imagine", "-h")
    shown = capsys.readouterr().out
    assert "openai-images, azure, azure-images" in shown
    for name in IMAGES_API:
        assert name in get_session().class_traits()["provider"].help
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-secret-value-0123")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
    get_session().use(emulator=False)
    table = ip.run_line_magic("imagine", "providers")
    rows = {name.strip("* ").strip(): (state, keys) for name, state, keys in table.rows()}
    assert rows["azure-images"] == ("ready", "AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT")
    assert rows["openai-images"] == ("no key", "-")
    assert "azure-secret-value" not in repr(table)
    assert [line.strip("* ").split()[0] for line in repr(table).splitlines()[1:]] == list(PROVIDERS)


@pytest.mark.parametrize(("name", "variables"), [("openai-images", "OPENAI_API_KEY"),
                                                 ("azure-images", "AZURE_OPENAI_API_KEY or AZURE_OPENAI_AD_TOKEN "
                                                                  "and AZURE_OPENAI_ENDPOINT")])
def test_missing_credentials_are_named(ip, emu, name, variables) -> None:
    get_session().use(emulator=False)
    with pytest.raises(UsageError, match=f"No credentials for {name}: set {variables}"):
        imagine(ip, f"-p {name}", "a fox")
    assert emu.requests == []


def test_a_registered_images_config_is_of_the_images_family() -> None:
    session = ImagineSession()
    session.register("east", AzureOpenAIImagesConfig(model="east-images", azure_endpoint="https://e.example"))
    session.register("legacy", OpenAIImagesConfig(model="dall-e-2"))
    assert (session.kind("east"), session.kind("legacy")) == ("azure-images", "openai-images")
    assert session.is_images_api("east") and not session.is_images_api("openai")
    assert session.build_agent(provider="legacy", size="512x512").config.size == "512x512"
    with pytest.raises(Exception, match="dall-e-2 sizes are"):
        session.validate("legacy", size="1536x1024")


def test_dry_run_shows_one_request_for_n_images(ip, emu) -> None:
    imagine(ip, "-p openai-images -n 3 --dry-run", "a fox")
    shown = ip.user_ns["_outputs"][-1]["data"]["text/plain"]
    assert emu.requests == []
    assert "for 1 request" in shown and "3 image(s) per request" in shown and "Request:" in shown
    assert "/v1/images/generations" in shown and '"n": 3' in shown


def test_the_panel_offers_them_with_their_options() -> None:
    session = ImagineSession()
    panel = ProviderPanel(session)
    offered = dict((value, label) for label, value in panel.provider.options)
    assert offered["openai-images"] == PROVIDER_LABELS["openai-images"] == "OpenAI Images API"
    assert offered["azure-images"] == "Azure OpenAI Images API"
    panel.provider.value = "azure-images"
    assert session.provider == "azure-images" and panel.model.placeholder == "gpt-image-2"
    tool_only = next(box for families, box in panel.family_boxes.items() if families == IMAGE_TOOL)
    assert tool_only.layout.display == "none"  # background responses: the Responses API only
    assert {"size", "quality", "output_format", "moderation"} <= {o.name for o in options_for("azure-images")}
    panel.close()


def test_the_studio_generates_and_edits_with_the_images_api(emu, tmp_path) -> None:
    from nbimagine._history import History
    from nbimagine._session import set_emulator
    from nbimagine._widgets import Studio

    set_emulator(emu)
    try:
        session = ImagineSession(emulator=True)
        session.use("openai-images", size="1024x1024")
        st = Studio(session, History(tmp_path / "h", notebook="studio.ipynb"), settings=False)
        st.view.prompt = "a lighthouse"
        st.start()
        assert st.wait(60) and not st.last_error
        assert image_calls(emu)[-1].path == "/v1/images/generations"
        first = st.selected[0]
        st.view.prompt = "make it night"
        st.start(edit=True)
        assert st.wait(60) and not st.last_error
        assert image_calls(emu)[-1].path == "/v1/images/edits"
        assert st.selected != [first] and list(st.history.get(st.selected[0]).parents) == [first]
        st.close()
    finally:
        set_emulator(None)
