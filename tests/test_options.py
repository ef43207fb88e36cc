"""The option table is the one source of truth: parser, help, session, ``%config``, panel and validation agree.

Table-driven over every option x every provider family: a new row in ``nbimagine._options.OPTIONS`` is
checked here without a new test (``SAMPLES`` must name a valid value for it, which the first test enforces).
Cells run through a real shell against the real emulator over HTTP.
"""

from __future__ import annotations

import json
import typing

import pytest
from IPython.core.error import UsageError

from nbimagine._magics import ImagineMagics
from nbimagine._options import IMAGE_TOOL, IMAGES_API, OPTIONS, SETTINGS, option, options_for
from nbimagine._session import ImagineSession, get_session
from nbimagine._widgets import CUSTOM, DEFAULT, ProviderPanel
from nbimagine.errors import ConfigError
from nbimagine.events import BinaryResult

FAMILIES = ("openai", "openai-images", "azure", "azure-images", "foundry", "gemini", "vertex")
# What a Foundry cell needs besides the option under test: an agent, and a deployment for nbimagine's version.
FOUNDRY = {"agent_name": "painter", "model": "gpt-4.1"}
# A valid, non-default value per option, and the magic line that sets it (some need a companion option).
SAMPLES = {
    "model": ("model-under-test", "-m model-under-test"),
    "project_endpoint": ("https://res.services.ai.azure.com/api/projects/p",
                         "--project-endpoint https://res.services.ai.azure.com/api/projects/p"),
    "agent_name": ("designer", "--agent designer"),
    "agent_version": ("3", "--agent-version 3"),
    "image_deployment": ("gpt-image-2", "--image-deployment gpt-image-2"),
    "background_mode": (True, "--background-mode"),
    "size": ("1536x1024", "--size 1536x1024"),
    "quality": ("low", "--quality low"),
    "background": ("opaque", "--background opaque"),
    "output_format": ("webp", "--format webp"),
    "output_compression": (40, "--format jpeg --compression 40"),
    "partial_images": (2, "--partial 2"),
    "moderation": ("low", "--moderation low"),
    "input_fidelity": ("high", "--fidelity high"),
    "aspect_ratio": ("16:9", "--aspect 16:9"),
    "image_size": ("2K", "--image-size 2K"),
    "response_modalities": (["IMAGE"], "--modalities IMAGE"),
    "max_retries": (1, "--retries 1"),
    "each": (True, "--each"),
    "batch": (True, "--batch"),
    "concurrency": (8, "--each --concurrency 8"),
    "rate_limit": (600, "--each --rate-limit 600"),
}
PROVIDER_ROWS = [o for o in OPTIONS if o.scope == "provider"]
# Values the SDK's Literal types allow that nbimagine deliberately does not offer, with the reason.
NOT_OFFERED = {
    # The Responses image tool documents png, jpeg and webp; gif and svg belong to newer image models
    # that the emulator cannot draw yet.
    "output_format": {"gif", "svg"},
}


def test_every_option_has_a_sample_and_a_well_formed_row():
    assert set(SAMPLES) == {opt.name for opt in OPTIONS}
    flags = [flag for opt in OPTIONS for flag in opt.flags]
    assert len(flags) == len(set(flags)), "two options share a flag"
    for opt in OPTIONS:
        assert opt.help and opt.flag.startswith("--")
        assert opt.validate(SAMPLES[opt.name][0]) == SAMPLES[opt.name][0]
        assert opt.validate(opt.default) == opt.default


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.target.startswith("ImageGenerationTool.")],
                         ids=lambda o: o.name)
def test_allowed_values_match_the_openai_sdk_types(opt):
    from openai.types.responses.tool import ImageGeneration

    annotation = ImageGeneration.model_fields[opt.target.split(".")[1]].annotation
    literal = {value for arg in typing.get_args(annotation) for value in typing.get_args(arg) or [arg]
               if isinstance(value, str)}
    if not literal:  # an int field: no Literal to compare
        assert opt.kind is int
        return
    assert set(opt.choices) <= literal, f"{opt.name}: values the SDK does not know"
    assert literal - set(opt.choices) == NOT_OFFERED.get(opt.name, set()), f"{opt.name}: SDK values not offered"


# --- parser and help -----------------------------------------------------------------------------


def _parser_actions():
    return {action.dest: action for action in ImagineMagics.imagine.parser._actions}


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_parser_and_help_read_the_table(opt):
    action = _parser_actions()[opt.name]
    assert tuple(action.option_strings) == opt.flags
    assert (action.type is int) == (opt.kind is int)
    doc = ImagineMagics.imagine.__doc__
    assert opt.flag in doc
    for value in opt.choices:  # e.g. xhigh and max: help lists exactly what validation accepts
        assert value in doc
    assert opt.help_text() == action.help.replace("%%", "%")


@pytest.mark.parametrize("line", ["--help", "-h", "use -h", "use --help", "-p gemini --help"])
def test_help_flags_print_the_help(ip, capsys, line):
    assert ip.run_line_magic("imagine", line) is None
    shown = capsys.readouterr().out
    assert "%imagine use PROVIDER" in shown
    for opt in OPTIONS:
        assert opt.flag in shown


def test_cell_magic_help_flag(ip, capsys, emu):
    ip.run_cell_magic("imagine", "--help", "a cat")
    assert "--quality" in capsys.readouterr().out
    assert not emu.requests


# --- session and %config ---------------------------------------------------------------------------


@pytest.mark.parametrize("opt", SETTINGS, ids=lambda o: o.name)
def test_session_and_config_traits_come_from_the_table(opt):
    session_trait = ImagineSession.class_traits()[opt.name]
    config_trait = ImagineMagics.class_traits()[opt.name]
    assert session_trait.default() == config_trait.default() == opt.default
    assert config_trait.metadata.get("config") is True
    assert opt.help_text() in config_trait.help


# --- every option x every provider ---------------------------------------------------------------


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 120, 200)).save(out, "PNG")
    return out.getvalue()


def option_by_flag(flag: str):
    return next(o for o in OPTIONS if flag in o.flags)


def _request_value(emu, name: str):
    """Where the provider's own parameter ended up in what the emulator received."""
    posts = [r for r in emu.requests if r.method == "POST"]
    created = [r for r in posts if "/agents/" in r.path and r.path.endswith("/versions")]
    body = created[-1].json["definition"] if created else posts[-1].json  # Foundry: in the agent's definition
    if "/images/" in posts[-1].path:  # the Images API: the GPT image models' parameters at the top
        return body.get(name)
    if "tools" in body:
        return body["tools"][0].get(name)
    config = body.get("generationConfig", {})
    if name == "response_modalities":
        return config.get("responseModalities")
    camel = "".join(part.capitalize() if i else part for i, part in enumerate(name.split("_")))
    return config.get("imageConfig", {}).get(camel)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("opt", PROVIDER_ROWS, ids=lambda o: o.name)
def test_an_option_reaches_its_provider_or_is_refused_with_the_equivalent(ip, emu, opt, family):
    value, line = SAMPLES[opt.name]
    if not opt.applies(family):
        with pytest.raises(UsageError) as info:
            ip.run_cell_magic("imagine", f"-p {family} {line} --no-history", "a cat")
        message = str(info.value)
        # The first option of the line that the provider does not take is named (--format before --compression).
        first = next(f for f in line.split() if f.startswith("-") and not option_by_flag(f).applies(family))
        assert message.startswith(f"{first} is a") and opt.owner in message and "\n" not in message
        assert not [r for r in emu.requests if r.method == "POST"]
        # The same option is refused by %imagine use, and the session is unchanged.
        before = get_session().options()
        with pytest.raises(UsageError, match=f"{first} is a"):
            ip.run_line_magic("imagine", f"use {family} {line}")
        assert get_session().options() == before
        return
    if opt.target.startswith("config."):
        # A field of the provider's config (not a request parameter): the config the agent is built with.
        needs = {"agent_name": "painter"} if family == "foundry" and opt.name != "agent_name" else {}
        agent = ImagineSession().build_agent(provider=family, **needs, **{opt.name: value})
        assert getattr(agent.config, opt.target.split(".")[1]) == value
        return
    extra = "--agent painter -m gpt-4.1 " if family == "foundry" else ""
    if opt.name == "input_fidelity" and family in IMAGES_API:
        # An edit parameter, which gpt-image-2 does without (warned, not sent): an edit with a model that takes it.
        ip.user_ns["photo"] = BinaryResult(_png())
        extra = "-m gpt-image-1.5 -e photo "
    ip.run_cell_magic("imagine", f"-p {family} {extra}{line} --no-history -o r", "a cat")
    assert _request_value(emu, opt.name) == value
    assert ip.user_ns["r"].files


def test_the_equivalent_named_in_a_refusal_is_itself_accepted(ip, emu):
    with pytest.raises(UsageError, match="for OpenAI use --size 1536x1024") as info:
        ip.run_cell_magic("imagine", "-p openai --aspect 16:9", "a cat")
    assert "--aspect is a Gemini option" in str(info.value)
    ip.run_cell_magic("imagine", "-p openai --size 1536x1024 --no-history -o r", "a cat")
    assert (ip.user_ns["r"].files[0].width, ip.user_ns["r"].files[0].height) == (1536, 1024)
    with pytest.raises(UsageError, match="for Gemini use --aspect 3:2 --image-size 1K"):
        ip.run_cell_magic("imagine", "-p gemini --size 1536x1024", "a cat")
    ip.run_cell_magic("imagine", "-p gemini --aspect 3:2 --image-size 1K --no-history -o r", "a cat")
    assert ip.user_ns["r"].files[0].width > ip.user_ns["r"].files[0].height


def test_use_quality_under_gemini_is_refused(ip):
    ip.run_line_magic("imagine", "use gemini")
    with pytest.raises(UsageError, match="--quality is an OpenAI option and gemini does not use it"):
        ip.run_line_magic("imagine", "use --quality low")
    assert get_session().quality is None


def test_defaults_kept_across_a_provider_switch_are_shown_as_inactive(ip):
    ip.run_line_magic("imagine", "use gemini --aspect 16:9 --image-size 512")
    shown = ip.run_line_magic("imagine", "use openai")
    text = repr(shown)
    assert "inactive with OpenAI (kept for Gemini): aspect_ratio=16:9, image_size=512" in text
    head = text.splitlines()[1]
    assert "aspect_ratio" not in head and "size=default" in head and "output_format=default" in head
    html = shown._repr_mimebundle_()["text/html"]
    assert "nbi-inactive" in html
    # Not sent: the next request has no Gemini options and a square default size.
    ip.run_cell_magic("imagine", "--no-history -o r", "a cat")
    assert (ip.user_ns["r"].files[0].width, ip.user_ns["r"].files[0].height) == (1024, 1024)


def test_use_shows_format_and_size(ip):
    shown = repr(ip.run_line_magic("imagine", "use openai --size 1536x1024 --format jpeg --compression 80"))
    assert "size=1536x1024" in shown and "output_format=jpeg" in shown and "output_compression=80" in shown


def test_config_may_set_another_providers_default_which_stays_inactive(ip):
    ip.run_line_magic("config", "ImagineMagics.aspect_ratio = '16:9'")
    session = get_session()
    assert session.provider == "openai" and session.aspect_ratio == "16:9"
    assert session.inactive_options() == {"aspect_ratio": "16:9"}
    assert "aspect_ratio" not in session.active_options()


# --- the panel reads the same table -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_panel_controls_follow_the_table(family):
    session = ImagineSession()
    panel = ProviderPanel(session)
    panel.provider.value = family
    for opt in SETTINGS:
        control = panel.controls[opt.name]
        box = next((b for fams, b in panel.family_boxes.items() if fams == opt.families), None)
        visible = box is None or box.layout.display != "none"
        assert visible == opt.applies(family), (opt.name, family)
        assert control.tooltip == opt.help_text() or opt.kind is list
        if opt.choices and opt.kind is str:
            offered = [value for _, value in control.options if value not in (DEFAULT, CUSTOM)]
            assert offered == list(opt.choices), opt.name
        if opt.bounds and opt.default is not None:
            assert (control.min, control.max) == opt.bounds
    assert set(panel.wanted()) == {"provider", "emulator", *(o.name for o in options_for(family))}
    panel.close()


@pytest.mark.parametrize("opt", [o for o in SETTINGS if o.families or o.scope == "set"], ids=lambda o: o.name)
def test_a_panel_value_reaches_the_session_for_its_provider(opt):
    session = ImagineSession()
    panel = ProviderPanel(session)
    panel.provider.value = (opt.families or ("openai",))[0]
    value = SAMPLES[opt.name][0]
    if opt.name == "output_compression":
        panel.output_format.value = "jpeg"
    panel._write(opt.name, value)
    panel.apply(changed=opt.name)
    assert getattr(session, opt.name) == value
    panel.close()


def test_validation_reads_the_table():
    session = ImagineSession()
    for opt in OPTIONS:
        if opt.choices and opt.kind is str:
            with pytest.raises(ConfigError, match=opt.flag):
                session.validate(opt.families[0] if opt.families else None, **{opt.name: "no-such-value"})
    with pytest.raises(ConfigError, match="--retries takes a whole number from 0 to 10"):
        session.validate(max_retries=11)
    with pytest.raises(ConfigError, match="uppercase K"):
        session.validate("gemini", image_size="2k")


def test_retries_reach_the_sdk_client(ip):
    ip.run_line_magic("imagine", "use --retries 5")
    agent = get_session().build_agent()
    assert agent.config.max_retries == 5
    assert get_session().build_agent(provider="gemini").config.max_retries == 5


def test_emulator_checks_against_the_same_constants():
    from nbimagine import tools
    from nbimagine.emulator import _openai

    assert _openai.QUALITIES is tools.QUALITIES is option("quality").choices
    assert _openai.FORMATS is tools.OUTPUT_FORMATS is option("output_format").choices
    assert _openai.BACKGROUNDS is tools.BACKGROUNDS is option("background").choices


def test_no_allowed_values_are_written_twice():
    """Every module that checks a value reads the one tuple (the per-model rules, the cost tables, the panel
    and the emulators); the literal lists left in the sources are the SDK-checked Foundry table only."""
    import re
    from pathlib import Path

    from nbimagine import _cost, _image_models, config, tools
    from nbimagine.emulator import _openai

    gpt_image_1 = _image_models.rules_for("gpt-image-1")
    assert gpt_image_1.sizes is tools.STANDARD_SIZES and gpt_image_1.output_formats is tools.OUTPUT_FORMATS
    assert gpt_image_1.backgrounds is tools.BACKGROUNDS and gpt_image_1.moderations is tools.MODERATIONS
    assert set(_openai.STANDARD_SIZES) == set(_cost.OPENAI_STANDARD_SIZES) == set(tools.STANDARD_SIZES) - {"auto"}
    assert option("response_modalities").choices == tuple(m for m in config.GEMINI_MODALITIES if m != "AUDIO")
    source = Path(tools.__file__).parent
    literal = re.compile(r'\(\s*"(?:jpeg", "webp|1024x1024", "1024x1536|high", "low|TEXT", "IMAGE", "AUDIO)"')
    found = [f"{path.relative_to(source)}:{n}" for path in source.rglob("*.py") if path.name != "tools.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert all(name.startswith("config.py:") for name in found), found  # where GEMINI_MODALITIES is defined


def test_dir_shows_the_public_surface():
    import nbimagine

    names = dir(nbimagine)
    for public in ("Agent", "history", "panel", "studio", "config", "tools", "events", "errors"):
        assert public in names
    for private in ("Any", "TYPE_CHECKING", "annotations"):
        assert private not in names
    assert nbimagine.tools.ImageGenerationTool  # a listed submodule is reachable as an attribute


def test_tool_families_are_what_the_session_builds_a_tool_for():
    session = ImagineSession()
    for family in FAMILIES:
        agent = session.build_agent(provider=family, **(FOUNDRY if family == "foundry" else {}))
        assert bool(agent.tools) == (family in IMAGE_TOOL), family


# --- image sets: their options are rows of the same table ----------------------------------------------


def test_cell_modes_are_flags_of_the_line_not_session_options(ip):
    modes = [o for o in OPTIONS if o.scope == "cell"]
    assert {o.name for o in modes} == {"each", "batch"}
    for opt in modes:
        assert opt.name not in ImagineSession.class_traits() and opt.name not in ImagineMagics.class_traits()
        assert _parser_actions()[opt.name].nargs == 0  # --each alone: never swallows the next word
        with pytest.raises(UsageError, match=f"{opt.flag} applies to one generation"):
            ip.run_line_magic("imagine", f"use {opt.flag}")
        with pytest.raises(ConfigError, match=f"Unknown option {opt.name}"):
            get_session().use(**{opt.name: True})


# What the refusals name for magic-line options that are not rows (argparse dests).
_LINE_ONLY = {"edit": "-e last", "ref": "-r last", "mask": "-e last --mask last", "no_history": "--no-history"}


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.needs or o.excludes], ids=lambda o: o.name)
def test_what_a_row_needs_or_excludes_is_refused_before_any_request(ip, emu, opt):
    line = SAMPLES[opt.name][1]
    if opt.needs:
        alone = " ".join(word for word in line.split() if word not in {option(n).flag for n in opt.needs})
        with pytest.raises(UsageError, match=f"^{opt.flag} applies to an image set: add --each"):
            ip.run_cell_magic("imagine", alone, "a cat\na dog")
    for name in opt.excludes:
        other = SAMPLES[name][1] if name in SAMPLES else _LINE_ONLY[name]
        with pytest.raises(UsageError, match=f"cannot go with {opt.flag}: ") as info:
            ip.run_cell_magic("imagine", f"{line} {other}", "a cat\na dog")
        assert "\n" not in str(info.value)
    assert not [r for r in emu.requests if r.method == "POST"]


def test_set_options_reach_the_run_from_the_line_the_session_and_config(ip, emu):
    ip.run_line_magic("config", "ImagineMagics.concurrency = 2")
    assert get_session().concurrency == 2
    ip.run_cell_magic("imagine", "--each --rate-limit 6000 --size 256x256 --no-history -o s", "a cat\na dog")
    shown = ip.user_ns["s"]
    assert (shown.concurrency, shown.rate_limit, len(shown.ok)) == (2, 6000, 2)
    listing = repr(ip.run_line_magic("imagine", "use --concurrency 3 --rate-limit 3000"))
    assert "concurrency=3" in listing and "rate_limit=3000" in listing
    ip.run_cell_magic("imagine", "--each --size 256x256 --no-history -o s", "a cat\na dog")
    assert (ip.user_ns["s"].concurrency, ip.user_ns["s"].rate_limit) == (3, 3000)
    import nbimagine

    made = nbimagine.generate_many(["a cat"], size="256x256", record=False, progress=False, concurrency=1)
    assert (made.concurrency, made.rate_limit) == (1, 3000)  # its own argument wins, the session fills the rest
    with pytest.raises(ConfigError, match=r"^concurrency= takes a whole number from 1 to 64, not 0"):
        nbimagine.generate_many(["a cat"], record=False, progress=False, concurrency=0)
    # Not sent: the provider saw no such parameter, and the history records none.
    body = [r for r in emu.requests if r.method == "POST"][-1].json
    assert "concurrency" not in json.dumps(body) and "rate_limit" not in json.dumps(body)


def test_a_typed_rate_limit_in_the_panel_is_a_number_or_a_reason():
    session = ImagineSession()
    panel = ProviderPanel(session)
    panel.rate_limit.value = "90"
    assert session.rate_limit == 90
    panel.rate_limit.value = "fast"
    # Text being typed stays, beside the reason and the value in effect (the panel's rule for free text).
    error = panel.errors["rate_limit"].value
    assert session.rate_limit == 90 and panel.rate_limit.value == "fast"
    assert "fast is not applied yet: takes a whole number" in error and "in effect: 90" in error
    panel.close()
