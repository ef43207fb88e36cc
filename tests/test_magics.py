"""``%%imagine`` and ``%imagine`` driven through a real IPython ``InteractiveShell``.

Requests go over HTTP to the real emulator (the shared ``emu`` fixture) through the real SDKs; the
history is a real one in a temporary folder. Display output is captured with IPython's own
``CapturingDisplayPublisher`` so that display-id updates can be checked.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from nbimagine._magics import interpolate
from nbimagine._session import get_session
from nbimagine.errors import ContentPolicyError, ImagineWarning, ProviderError
from nbimagine.events import BinaryResult

ROOT = Path(__file__).resolve().parents[1]


def outputs(shell) -> list[dict]:
    return shell.display_pub.outputs


def final_outputs(shell) -> list[dict]:
    """The new outputs of the last cell after its progress slot (what frontends without updates see)."""
    published = outputs(shell)
    slots = [i for i, o in enumerate(published) if (o.get("transient") or {}).get("display_id") and not o["update"]]
    return [o for o in published[slots[-1] + 1:] if not o["update"]]


def image_outputs(shell) -> list[dict]:
    return [o for o in final_outputs(shell) if any(k.startswith("image/") for k in o["data"])]


def imagine(shell, line: str, cell: str):
    return shell.run_cell_magic("imagine", line, cell)


def last_body(emu) -> dict:
    posts = [r for r in emu.requests if r.method == "POST"]
    assert posts, "no request reached the emulator"
    return posts[-1].json


def prompt_text(body: dict) -> str:
    return json.dumps(body)


# --- loading ---------------------------------------------------------------------------------------


def test_load_ext_is_light_and_registers_magics():
    code = (
        "import sys, time\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "t = time.perf_counter(); ip.run_line_magic('load_ext', 'nbimagine'); dt = time.perf_counter() - t\n"
        "heavy = [m for m in ('openai', 'google.genai', 'PIL.Image', 'nbimagine._history') if m in sys.modules]\n"
        "magics = ip.magics_manager.magics\n"
        "print(dt, heavy, 'imagine' in magics['cell'], 'imagine' in magics['line'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NBIMAGINE_EMULATOR": ""}).stdout.split()
    assert out[1:] == ["[]", "True", "True"]  # its time is the benchmark's (make bench): no timed unit test


def test_unload_and_reload(ip):
    ip.run_line_magic("unload_ext", "nbimagine")
    assert "imagine" not in ip.magics_manager.magics["cell"]
    ip.run_line_magic("load_ext", "nbimagine")
    assert "imagine" in ip.magics_manager.magics["cell"]


def test_environment_variable_turns_emulator_on_with_a_banner():
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance(); ip.run_line_magic('load_ext', 'nbimagine')\n"
        "from nbimagine._session import get_session; print('EMULATOR', get_session().emulator)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NBIMAGINE_EMULATOR": "1"}).stdout
    assert "nbimagine emulator ON" in out
    assert "EMULATOR True" in out


# --- interpolation ---------------------------------------------------------------------------------


def test_interpolate_only_known_names():
    ns = {"style": "ukiyo-e", "n": 3}
    text = 'A {style} fox, {n} tails, {unknown} and JSON {"a": {"b": 1}} and {{style}} and {} and { style }'
    assert interpolate(text, ns) == (
        'A ukiyo-e fox, 3 tails, {unknown} and JSON {"a": {"b": 1}} and {style} and {} and { style }'
    )


def test_cell_prompt_is_interpolated_and_sent(ip, emu):
    ip.user_ns["animal"] = "otter"
    imagine(ip, "", 'A watercolor {animal} holding {"key": "value"} and {missing}')
    sent = prompt_text(last_body(emu))
    assert "A watercolor otter holding" in sent
    assert '{missing}' in sent
    assert '\\"key\\": \\"value\\"' in sent


def test_one_line_prompt_form(ip, emu):
    ip.run_line_magic("imagine", "a tiny red house -o r")
    assert isinstance(ip.user_ns["r"].files[0], BinaryResult)
    assert "a tiny red house" in prompt_text(last_body(emu))


def test_one_line_prompt_with_an_apostrophe(ip, emu):
    ip.run_line_magic("imagine", "a cat's hat -o r --no-history")
    assert "a cat's hat" in prompt_text(last_body(emu))


def test_bad_out_name_is_refused_before_any_request(ip, emu):
    from nbimagine._history import history

    for name in ("1bad", "class"):
        with pytest.raises(UsageError, match="-o needs a variable name"):
            imagine(ip, f"-o {name}", "a cat")
    assert not [r for r in emu.requests if r.method == "POST"]
    assert len(history()) == 0


def test_use_with_a_provider_word_and_p_flag_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="one provider"):
        ip.run_line_magic("imagine", "use gemini -p openai")
    assert get_session().provider == "openai"


def test_one_line_prompt_is_expanded_once_by_ipython(ip, emu):
    # IPython expands {name} on the magic line already; a second pass would turn its escape {{x}}
    # into x's value and expand braces inside the values.
    ip.user_ns.update(x="VALUE", t="has {x} inside")
    ip.run_line_magic("imagine", "literal {{x}} and {t} --no-history")
    assert "literal {x} and has {x} inside" in prompt_text(last_body(emu))


# --- options ---------------------------------------------------------------------------------------


def test_openai_options_reach_the_image_tool(ip, emu):
    imagine(ip, "-p openai --size 1536x1024 --quality low --format jpeg --compression 40 "
                "--background opaque --moderation low -o r", "a lighthouse")
    body = last_body(emu)
    tool = next(t for t in body["tools"] if t["type"] == "image_generation")
    assert {k: tool[k] for k in ("size", "quality", "output_format", "output_compression", "background",
                                 "moderation")} == {
        "size": "1536x1024", "quality": "low", "output_format": "jpeg", "output_compression": 40,
        "background": "opaque", "moderation": "low"}
    assert body.get("tool_choice") in ({"type": "image_generation"}, "image_generation")
    image = ip.user_ns["r"].files[0]
    assert image.media_type == "image/jpeg"
    assert (image.width, image.height) == (1536, 1024)


def test_gemini_options_reach_image_config(ip, emu):
    imagine(ip, "-p gemini --aspect 16:9 --image-size 2K -o r", "a harbor at dawn")
    body = last_body(emu)
    config = body["generationConfig"]
    assert config["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert "IMAGE" in config["responseModalities"]
    image = ip.user_ns["r"].files[0]
    assert image.width > image.height


def test_model_option_and_session_defaults(ip, emu):
    ip.run_line_magic("imagine", "use gemini --aspect 3:4")
    assert get_session().provider == "gemini"
    imagine(ip, "-m gemini-custom-image", "a teapot")
    request = [r for r in emu.requests if r.method == "POST"][-1]
    assert "gemini-custom-image" in request.path
    assert request.json["generationConfig"]["imageConfig"]["aspectRatio"] == "3:4"


def test_config_magic_forwards_to_session_and_validates(ip):
    ip.run_line_magic("config", "ImagineMagics.quality = 'high'")
    assert get_session().quality == "high"
    before = get_session().size
    ip.run_line_magic("config", "ImagineMagics.size = 'huge'")  # IPython reports the TraitError
    assert get_session().size == before
    ip.run_line_magic("imagine", "use --size 1024x1536")
    assert ip.run_line_magic("config", "ImagineMagics.size") == "1024x1536"


@pytest.mark.parametrize(("line", "fragment"), [
    ("--bogus", "unrecognized arguments: --bogus"),
    ("--size 1000x1000", "multiples of 16"),
    ("--size big", "WIDTHxHEIGHT"),
    # The tool's combined rules in the magic's words (flags, not Python parameters).
    ("--format jpg --background transparent", "use --format png or webp with a transparent --background"),
    # Quotes around a value are the shell's, not part of the value: an empty quoted value is missing.
    ("-m ''", "--model needs a value"),
    ('-p azure --image-deployment ""', "--image-deployment needs a value"),
    ('-p gemini --aspect "5:1"', "not '5:1'"),
    # Numbers beyond SQLite's 64-bit integers are images that do not exist.
    ("-e #99999999999999999999999", "no image #99999999999999999999999"),
    ("-e -99999999999999999999", "has only 0 image(s)"),
    ("-e -0", "-0 is not a position"),
    ("--format jpeg --compression 500", "0 to 100"),
    ("--partial 9", "--partial takes a whole number from 0 to 3, not 9"),
    ("-p dalle", "Unknown provider 'dalle'"),
    ("-p gemini --aspect 5:1", "--aspect must be one of 1:1, 2:3"),
    ("-p gemini --image-size 2k", "uppercase K"),
    ("-n 0", "-n takes 1 to"),
    ("-e nothing_like_this", "Unknown image reference 'nothing_like_this'"),
    ("-e last", "has only 0 image(s)"),
    ("-e #99", "no image #99"),
    ("stray words", "the prompt goes in the cell body"),
])
def test_user_mistakes_are_one_line_usage_errors(ip, emu, line, fragment):
    with pytest.raises(UsageError) as info:
        imagine(ip, line, "a cat")
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert not [r for r in emu.requests if r.method == "POST"]


def test_a_one_line_prompt_starting_with_a_dash_says_how(ip, emu):
    with pytest.raises(UsageError, match="goes after --: %imagine -- -PROMPT"):
        ip.run_line_magic("imagine", "-a cat in a hat")
    ip.run_line_magic("imagine", "--no-history -- -a cat in a hat")
    assert "-a cat in a hat" in prompt_text(last_body(emu))
    with pytest.raises(UsageError) as info:  # in a cell, an unknown option is a typo: no such advice
        imagine(ip, "-a", "a cat")
    assert "PROMPT" not in str(info.value)


def test_quoted_values_lose_their_quotes_and_reach_the_request(ip, emu):
    imagine(ip, '-m "gpt-4.1" --size \'256x256\' -o r', "a cat")
    assert ip.user_ns["r"].model == "gpt-4.1"
    assert last_body(emu)["model"] == "gpt-4.1"
    assert last_body(emu)["tools"][0]["size"] == "256x256"


@pytest.mark.parametrize("line", ["show #99999999999999999999999", "show -99999999999999999999999",
                                  "lineage 99999999999999999999999", "mask #99999999999999999999999",
                                  "show -0"])
def test_huge_or_empty_positions_are_one_line_usage_errors(ip, line):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("imagine", line)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("line", ["history 99999999999999999999999", "export out 99999999999999999999999"])
def test_huge_counts_mean_every_image(ip, emu, line):
    imagine(ip, "--size 256x256", "a cat")
    ip.run_line_magic("imagine", line)


# Every subcommand with arguments it cannot take: one line that says what it takes, never a traceback.
WRONG_SUBCOMMANDS = {
    "use": ["nosuch", "openai extra words", "--quality", "openai -n 2", "gemini --quality low"],
    "history": ["abc", "-5", "--notebook", "--merge", "--root", "--bogus"],
    "show": ["", "abc", "#-1", "last --bogus", "#99999999999999999999999"],
    "lineage": ["", "zz", "99999999999999999999999"],
    "export": ["", "out abc", "a b c"],
    "providers": ["extra"],
    "emulator": ["maybe"],
    "budget": ["abc", "-5", "nan", "1e400", "1 2"],
    "cost": ["extra"],
    "mask": ["", "nosuch", "last -o 1x", "last -o"],
    "jobs": ["bogus", "wait", "cancel zz"],
    "panel": ["extra"],
    "studio": ["extra"],
}


def test_every_subcommand_is_covered():
    from nbimagine._magics import SUBCOMMANDS

    assert set(WRONG_SUBCOMMANDS) == set(SUBCOMMANDS)


@pytest.mark.parametrize("line", [f"{name} {rest}".strip() for name, wrong in WRONG_SUBCOMMANDS.items()
                                  for rest in wrong])
def test_a_subcommand_with_wrong_arguments_is_one_usage_error_line(ip, emu, line):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("imagine", line)
    assert "\n" not in str(info.value) and str(info.value).strip()
    assert not [r for r in emu.requests if r.method == "POST"]


def test_empty_prompt_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="prompt is empty"):
        imagine(ip, "", "   \n")


def test_missing_key_says_how_to_fix_and_never_suggests_env(ip, emu):
    get_session().use(emulator=False)
    with pytest.raises(UsageError) as info:
        imagine(ip, "", "a cat")
    message = str(info.value)
    assert "OPENAI_API_KEY" in message
    assert "getpass" in message and "emulator on" in message
    assert "%env KEY" not in message
    assert not emu.requests


def test_usage_error_in_run_cell_shows_one_line(ip, capsys):
    result = ip.run_cell("%%imagine --size 7x7\na cat")
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr()
    shown = (err.out + err.err).strip().splitlines()
    assert shown == [f"UsageError: {result.error_in_exec}"]


# --- provider failures -----------------------------------------------------------------------------


def test_provider_failure_fails_the_cell_with_a_short_message(ip, emu, capsys):
    emu.inject("http", status=400, times=1)
    result = ip.run_cell("%%imagine\na cat")
    assert isinstance(result.error_in_exec, ProviderError)
    assert result.error_in_exec.status == 400
    printed = capsys.readouterr()
    lines = [ln for ln in (printed.out + printed.err).splitlines() if ln.strip()]
    assert len(lines) <= 2 and lines[-1].startswith("ProviderError: [openai, HTTP 400")
    final = outputs(ip)[-1]
    assert "Failed after" in final["data"]["text/plain"]


def test_moderation_block_raises_content_policy_error(ip, emu):
    emu.inject("moderation", times=1)
    with pytest.raises(ContentPolicyError):
        imagine(ip, "--no-history", "a cat")


# --- edit references -------------------------------------------------------------------------------


def _input_images(body: dict) -> int:
    text = json.dumps(body)
    return text.count('"input_image"') + text.count('"inlineData"') + text.count('"inline_data"')


def test_every_ref_form_sends_the_image_and_links_lineage(ip, emu, tmp_path):
    from PIL import Image

    from nbimagine._history import history

    imagine(ip, "-o first", "a red square")
    imagine(ip, "-o second", "a blue circle")
    h = history()
    first_id, second_id = h[0].id, h[1].id
    png = h[0].path.read_bytes()
    (tmp_path / "input.png").write_bytes(png)
    ip.user_ns.update(
        img=ip.user_ns["first"].files[0], raw=png, pil=Image.open(io.BytesIO(png)),
        pathvar=str(tmp_path / "input.png"), pathobj=tmp_path / "input.png", rep=ip.user_ns["second"],
        entry=h.get(first_id),
    )
    # Positional refs resolve against the history as it is when the cell runs.
    cases = {
        "last": lambda: [h[-1].id], "-2": lambda: [h[-2].id], f"#{first_id}": lambda: [first_id],
        "img": lambda: [first_id], "rep": lambda: [second_id], "entry": lambda: [first_id],
        "raw": list, "pil": list, "pathvar": list, "pathobj": list, "input.png": list,
    }
    for ref, expected in cases.items():
        parents = expected()
        imagine(ip, f"-e {ref}", f"edit via {ref}")
        assert _input_images(last_body(emu)) == 1, ref
        assert list(h[-1].parents) == parents, ref
        assert h[-1].prompt == f"edit via {ref}"
    imagine(ip, f"-e #{first_id} -e #{second_id}", "combine both")
    assert _input_images(last_body(emu)) == 2
    assert list(h[-1].parents) == [first_id, second_id]
    assert [e.id for e in h.lineage(h[-1].id)] == [first_id, second_id, h[-1].id]


def test_ref_to_a_non_image_variable_is_a_usage_error(ip):
    ip.user_ns["number"] = 42
    ip.user_ns["notimage"] = b"plain bytes"
    with pytest.raises(UsageError, match="number is a int"):
        imagine(ip, "-e number", "x")
    with pytest.raises(UsageError, match="not a PNG, JPEG"):
        imagine(ip, "-e notimage", "x")


# --- output, history, display ----------------------------------------------------------------------


def test_out_full_and_no_history(ip, emu):
    from nbimagine._history import history

    imagine(ip, "-o r --no-history --full", "a kite")
    reply = ip.user_ns["r"]
    assert len(history()) == 0
    assert "history_id" not in reply.files[0].metadata
    [final] = [o["data"] for o in image_outputs(ip)]
    assert final["image/png"]  # full resolution, original format
    import base64

    assert base64.b64decode(final["image/png"]) == reply.files[0].data
    imagine(ip, "-o r2", "a kite")
    assert len(history()) == 1
    assert ip.user_ns["r2"].files[0].metadata["history_id"] == history()[-1].id


def test_progress_slot_is_updated_in_place_with_partials_then_final(ip, emu):
    imagine(ip, "--partial 2 -o r", "a sailing ship")
    published = outputs(ip)
    first, updates = published[0], [o for o in published[1:] if o["update"]]
    display_id = first["transient"]["display_id"]
    assert first["data"]["text/plain"] == "Generating with openai/gpt-4.1 (emulator)…"  # no time: it may stay
    assert updates and all(u["transient"]["display_id"] == display_id for u in updates)
    partial_updates = [u for u in updates if "partial" in u["data"]["text/html"]]
    assert [u["data"]["text/html"].count("<img") for u in partial_updates[:2]] == [1, 1]
    assert "partial 1" in partial_updates[0]["data"]["text/html"]
    assert "partial 2" in partial_updates[-1]["data"]["text/html"]
    # The slot ends as a short pointer; the image itself is a new output that every frontend renders.
    assert "1 image below" in updates[-1]["data"]["text/plain"] and "<img" not in updates[-1]["data"]["text/html"]
    [image] = image_outputs(ip)
    final = image["data"]
    assert final["image/jpeg"] and set(final) == {"image/jpeg", "text/plain"}
    caption = final["text/plain"]
    entry_id = ip.user_ns["r"].files[0].metadata["history_id"]
    sha = ip.user_ns["r"].files[0].sha256  # a saved notebook links back to the history's file
    assert image["metadata"]["nbimagine"] == {"history_id": entry_id, "sha256": sha,
                                              "file": f".nbimagine/images/{sha[:2]}/{sha}.png"}
    assert caption.startswith(f"#{entry_id} · openai/")
    for piece in ("1024x1024", "PNG", "KB", " s"):
        assert piece in caption
    assert "revised prompt:" in caption
    reply_text = ip.user_ns["r"].body
    assert final_outputs(ip)[0]["data"]["text/plain"] == reply_text  # the reply's text comes first, once


def test_reply_text_shows_above_the_image(ip):
    imagine(ip, "-o r", "a lantern")
    reply = ip.user_ns["r"]
    assert reply.body
    kinds = ["image" if any(k.startswith("image/") for k in o["data"]) else o["data"].get("text/plain", "caption")
             for o in final_outputs(ip)]
    assert kinds[:2] == [reply.body, "image"]


def test_variants_run_concurrently_and_show_as_a_grid(ip, emu):
    import _thread

    from nbimagine._history import history

    # Concurrent: all four requests reach the emulator while none has been answered (a long latency; the
    # watcher presses Ctrl-C once it has seen four, or after 20 s: sequential variants would show one).
    emu.latency = 60.0
    seen: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 20
        while len([r for r in emu.requests if r.method == "POST"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(len([r for r in emu.requests if r.method == "POST"]))
        _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        imagine(ip, "-n 4 --no-history", "four moons")
    assert seen == [4]
    emu.reset()
    from nbimagine._generate import Generation

    # Concurrent, checked without a clock: the emulator answers nothing until all 4 requests are in flight
    # (sequential requests would stop at one; the helper then gives up after 60 s and the test fails).
    in_flight: list[int] = []

    def release_when_all_arrived() -> None:
        deadline = time.time() + 60
        while len([r for r in emu.requests if r.method == "POST"]) < 4 and time.time() < deadline:
            time.sleep(0.01)
        in_flight.append(len([r for r in emu.requests if r.method == "POST"]))
        emu.release()

    emu.hold()
    threading.Thread(target=release_when_all_arrived, daemon=True).start()
    Generation("four moons", n=4, record=False).run()
    assert in_flight == [4]
    imagine(ip, "-n 4 -o rs", "four moons")
    assert len(ip.user_ns["rs"]) == 4
    assert len(history()) == 4
    assert all(e.params.get("n") == 4 for e in history())
    images = image_outputs(ip)
    assert len(images) == 4 and all(o["metadata"]["image/jpeg"]["width"] == 384 for o in images)


def test_ctrl_c_stops_the_call_and_the_kernel_stays_usable(ip, emu, ctrl_c_when_in_flight):
    from nbimagine._history import history

    emu.latency = 30.0
    pressed = ctrl_c_when_in_flight()
    with pytest.raises(KeyboardInterrupt) as info:
        imagine(ip, "", "a very slow painting")
    assert time.perf_counter() - pressed[0] < 2.0
    # One line, no traceback: IPython renders an exception through _render_traceback_.
    [line] = info.value._render_traceback_()
    assert line.startswith("KeyboardInterrupt: Cancelled after") and "nothing was recorded" in line
    assert outputs(ip)[-1]["data"]["text/plain"].startswith("Stopped after")
    deadline = time.time() + 5
    while emu.aborted < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert emu.aborted >= 1  # the HTTP request was really dropped, not left running
    assert len(history()) == 0
    emu.latency = 0.0
    imagine(ip, "-o after", "a quick sketch")
    assert ip.user_ns["after"].files


# --- subcommands -----------------------------------------------------------------------------------


def test_history_show_lineage_export(ip, tmp_path):
    imagine(ip, "", "a green apple")
    imagine(ip, "-e last", "make it red")
    gallery = ip.run_line_magic("imagine", "history 5")
    bundle, metadata = gallery._repr_mimebundle_()
    assert [i["history_id"] for i in metadata["nbimagine"]["images"]] == [2, 1]
    assert "#1" in bundle["text/plain"] and "#2" in bundle["text/plain"]
    assert bundle["text/html"].count("<img") == 2 and "make it red" in bundle["text/html"]
    shown, metadata = ip.run_line_magic("imagine", "show #1")._repr_mimebundle_()
    assert shown["text/plain"].startswith("#1 ·") and "a green apple" in shown["text/plain"]
    assert metadata["nbimagine"]["history_id"] == 1 and metadata["nbimagine"]["file"].startswith(".nbimagine/images/")
    assert ip.run_line_magic("imagine", "show 2")._repr_mimebundle_()[0]["text/plain"].startswith("#2")
    lineage = ip.run_line_magic("imagine", "lineage last")
    assert [e.id for e in lineage.entries] == [1, 2]
    ip.run_line_magic("imagine", f"export {tmp_path / 'out'}")
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert exported[-1] == "history.json" and len(exported) == 3
    with pytest.raises(UsageError, match="show takes one image"):
        ip.run_line_magic("imagine", "show")


def test_providers_lists_key_names_never_values(ip, monkeypatch):
    secret = "sk-test-ABCDEF0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    get_session().use(emulator=False)
    table = ip.run_line_magic("imagine", "providers")
    bundle = table._repr_mimebundle_()
    assert "OPENAI_API_KEY" in bundle["text/plain"]
    assert secret not in json.dumps(bundle) and secret not in repr(table)
    rows = {name.strip("* ").strip(): state for name, state, _ in table.rows()}
    assert rows == {"openai": "ready", "openai-images": "ready", "azure": "no key", "azure-images": "no key",
                    "foundry": "no key", "gemini": "no key", "vertex": "no key"}
    assert get_session().key_status()["openai"] is True


def test_emulator_on_off(ip, capsys):
    ip.run_line_magic("imagine", "emulator off")
    assert get_session().emulator is False
    ip.run_line_magic("imagine", "emulator on")
    assert get_session().emulator is True
    assert any("nbimagine emulator ON" in o["data"]["text/plain"] for o in outputs(ip))
    with pytest.raises(UsageError):
        ip.run_line_magic("imagine", "emulator maybe")


def test_registered_provider_name(ip, emu):
    from nbimagine.config import AzureOpenAIResponsesConfig

    get_session().register("azure_east", AzureOpenAIResponsesConfig(model="east-gpt", image_deployment="img-east"))
    imagine(ip, "-p azure_east -o r", "a bridge")
    request = [r for r in emu.requests if r.method == "POST"][-1]
    assert request.json["model"] == "east-gpt"
    assert request.headers.get("x-ms-oai-image-generation-deployment") == "img-east"
    assert "/openai/" in request.path


# --- the session and the generation runner (shared with the widget panels) ------------------------


def test_session_use_is_validated_and_atomic(ip):
    session = get_session()
    seen = []

    def watch(change):
        seen.append(change["name"])

    session.observe(watch, names=["provider", "model", "aspect_ratio"])
    try:
        with pytest.raises(Exception, match="--aspect must be one of"):
            session.use("gemini", aspect_ratio="7:3")
        assert session.provider == "openai" and seen == []  # nothing half-applied
        session.use("openai", model="gpt-custom")
        session.use("gemini", aspect_ratio="16:9")
        assert (session.provider, session.model, session.aspect_ratio) == ("gemini", None, "16:9")
        assert session.effective_model() == "gemini-3.1-flash-image"
        with pytest.raises(Exception, match="Unknown option"):
            session.use(colour="red")
    finally:
        session.unobserve(watch, names=["provider", "model", "aspect_ratio"])


def test_build_agent_routes_every_provider_to_the_emulator(ip, emu):
    from nbimagine.config import AzureOpenAIResponsesConfig, GeminiConfig, OpenAIResponsesConfig, VertexAIConfig
    from nbimagine.tools import ImageGenerationTool

    session = get_session()
    kinds = {"openai": OpenAIResponsesConfig, "azure": AzureOpenAIResponsesConfig, "gemini": GeminiConfig,
             "vertex": VertexAIConfig}
    for name, cls in kinds.items():
        shape = {"size": "1024x1536"} if name in ("openai", "azure") else {"aspect_ratio": "3:4"}
        agent = session.build_agent(provider=name, **shape)
        assert type(agent.config) is cls
        assert agent.config.base_url.startswith(emu.url)
        if name in ("openai", "azure"):
            assert agent.config.tool_choice == "image_generation"
            assert agent.tools == [ImageGenerationTool(size="1024x1536")]
        else:
            assert agent.tools == [] and dict(agent.config.image_config) == {"aspect_ratio": "3:4"}


def test_generation_runs_variants_records_and_reports_events_off_the_main_thread(ip, emu):
    from nbimagine._generate import Generation
    from nbimagine._history import history

    threads = set()
    events = []

    def on_event(index, event):
        threads.add(threading.current_thread().name)
        events.append((index, type(event).__name__))

    gen = Generation("two kites", n=2, overrides={"partial_images": 1}, parents=())
    replies = gen.run(on_event=on_event)
    assert len(replies) == 2 and len(gen.entries) == 2 and len(history()) == 2
    assert threads == {"nbimagine-loop"}
    for index in (0, 1):
        kinds = [k for i, k in events if i == index]
        assert kinds[0] == "PartialImageEvent" and kinds[-1] == "ReplyEvent"
    assert gen.entries[0].params == {"partial_images": 1, "n": 2}
    assert gen.elapsed > 0


def test_images_made_before_a_failure_are_recorded(ip, emu):
    from nbimagine._generate import Generation
    from nbimagine._history import history

    emu.inject("image_failed", times=1)
    gen = Generation("[images:2] a cat and a dog")
    with pytest.raises(ProviderError) as info:
        gen.run()
    assert len(info.value.files) == 1
    assert len(gen.entries) == 1 and len(history()) == 1
    assert history()[-1].sha256 == info.value.files[0].sha256


def test_generation_cancel(ip, emu):
    from nbimagine._generate import Generation

    emu.latency = 30.0
    gen = Generation("slow", record=False)
    job = gen.start()
    time.sleep(0.3)
    start = time.perf_counter()
    gen.cancel()
    assert job.done() and time.perf_counter() - start < 3.0


def test_help_lists_options_and_subcommands(ip, capsys):
    ip.run_cell("%%imagine?")
    shown = capsys.readouterr().out
    for piece in ("--aspect", "--partial N", "-e REF", "--no-history", "%imagine history [N]", "{name}"):
        assert piece in shown, piece


def test_panel_and_studio_subcommands_return_widgets_bound_to_the_session(ip):
    panel = ip.run_line_magic("imagine", "panel")
    studio = ip.run_line_magic("imagine", "studio")
    for shown in (panel, studio):
        assert hasattr(shown, "_repr_mimebundle_") or hasattr(shown, "_ipython_display_")
    assert panel.session is get_session() and studio.session is get_session()


def _break_image_folder(hist) -> None:
    # The history's image folder replaced by a file: every write fails (even as root).
    images = hist.path / "images"
    if images.exists():
        import shutil

        shutil.rmtree(images)
    images.write_bytes(b"not a folder")


def test_history_failure_after_a_provider_error_does_not_turn_into_an_empty_success(ip, emu):
    from nbimagine._generate import Generation
    from nbimagine._history import history

    _break_image_folder(history())
    emu.inject("image_failed", times=1)
    gen = Generation("[images:2] a cat and a dog")
    with pytest.raises(ProviderError) as info, pytest.warns(ImagineWarning, match="history"):
        gen.run()
    assert len(info.value.files) == 1  # the image made before the failure is still handed back


def test_history_failure_after_success_keeps_the_images(ip, emu):
    from nbimagine._generate import Generation
    from nbimagine._history import history

    _break_image_folder(history())
    gen = Generation("a kite")
    with pytest.warns(ImagineWarning, match="could not be recorded in the history"):
        [reply] = gen.run()
    assert len(reply.files) == 1 and gen.entries == [] and "history_id" not in reply.files[0].metadata


def test_generation_records_the_params_it_started_with(ip, emu):
    from nbimagine._generate import Generation

    session = get_session()
    session.use("gemini", aspect_ratio="16:9")

    def on_event(index, event):  # mid-request, on the loop thread: like a panel edit from the UI thread
        session.aspect_ratio = "1:1"

    gen = Generation("a kite")
    gen.run(on_event=on_event)
    assert session.aspect_ratio == "1:1"
    assert gen.entries[0].params == {"aspect_ratio": "16:9"}


def test_parents_missing_from_the_history(ip, emu):
    from nbimagine._generate import Generation
    from nbimagine._history import history
    from nbimagine.errors import ConfigError

    with pytest.raises(ConfigError, match="#999"):
        Generation("x", parents=[999]).start()
    assert emu.requests == []
    # An image carrying another notebook's history id is still editable; only the foreign link is dropped.
    [made] = Generation("base", record=False).run()
    foreign = BinaryResult(made.files[0].data, {**made.files[0].metadata, "history_id": 999})
    [reply] = Generation("edit it", edits=[foreign]).run()
    assert len(reply.files) == 1 and list(history()[-1].parents) == []


def test_history_notebook_option_names_the_history(ip, tmp_path):
    from nbimagine._history import history, notebook_name, set_notebook

    try:
        ip.run_line_magic("imagine", "history --notebook 02_editing")
        assert notebook_name() == "02_editing"
        imagine(ip, "", "a heron")
        assert history().notebook == "02_editing" and [e.prompt for e in history("02_editing")] == ["a heron"]
        with pytest.raises(UsageError, match="give the notebook's name"):
            ip.run_line_magic("imagine", "history --notebook")
    finally:
        set_notebook(None)


def test_emulator_banner_reads_whole_words(ip):
    ip.run_line_magic("imagine", "emulator on")
    html = [o["data"]["text/html"] for o in outputs(ip) if "emulator ON" in o["data"].get("text/html", "")][-1]
    assert "</b>: every provider is answered" in html


def test_ipython_own_names_are_not_prompt_variables(ip, emu, monkeypatch):
    monkeypatch.setitem(ip.user_ns, "exit_sign", "EXIT")
    imagine(ip, "", "a box labelled {In} and {exit} under an {exit_sign} sign")
    sent = prompt_text(last_body(emu))
    assert "a box labelled {In} and {exit} under an EXIT sign" in sent
    monkeypatch.setitem(ip.user_ns, "In", "inside")  # a user's own variable with that name does count
    imagine(ip, "", "{In} the box")
    assert "inside the box" in prompt_text(last_body(emu))


# --- what a saved notebook holds -------------------------------------------------------------------


def _saved_cell_outputs(shell) -> list[dict]:
    """The outputs a frontend saves for the last cell: each display id at its last state, in order."""
    import nbformat

    slot_state: dict[str, dict] = {}
    saved: list[tuple[str | None, dict]] = []
    for o in outputs(shell):
        display_id = (o.get("transient") or {}).get("display_id")
        if o["update"]:
            slot_state[display_id] = o
            continue
        saved.append((display_id, o))
    return [nbformat.v4.new_output("display_data", data=(slot_state.get(d) or o)["data"],
                                   metadata=(slot_state.get(d) or o)["metadata"]) for d, o in saved]


def test_a_saved_notebook_holds_each_image_once_and_clips_long_texts(ip, emu, tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("%%imagine\na fox"))
    empty = tmp_path / "empty.ipynb"
    nbformat.write(nb, empty)
    imagine(ip, "--partial 2 -o r", "a fox in the snow")
    nb.cells[0].outputs = _saved_cell_outputs(ip)
    full = tmp_path / "full.ipynb"
    nbformat.write(nb, full)
    growth = full.stat().st_size - empty.stat().st_size
    assert growth <= 60 * 1024, f"{growth / 1024:.0f} KB for one 1024x1024 image"
    [image] = image_outputs(ip)
    assert full.read_text().count(image["data"]["image/jpeg"][:200]) == 1  # stored once
    assert "partial" not in full.read_text()  # the progress slot's partial images are not kept


def test_a_megabyte_of_revised_prompt_stays_out_of_the_notebook(ip, emu):
    from nbimagine._display import caption_for, caption_output, image_output, text_output

    huge = "a very long revised prompt " * 40_000
    from nbimagine.emulator._draw import render

    image = BinaryResult(render("x", 1024, 1024), {"revised_prompt": huge, "history_id": 3})
    data, _, _ = image_output(image, caption_for(image))
    total = len(json.dumps([data, caption_output(data["text/plain"]), text_output(huge)]))
    assert total <= 150 * 1024
    assert "more characters in the history" in data["text/plain"]


# --- background responses ----------------------------------------------------------------------------


def test_background_mode_runs_a_background_response_with_its_status_in_the_progress_line(ip, emu):
    emu.background_duration = 0.3
    imagine(ip, "--background-mode --size 256x256 -o r", "a lighthouse")
    created = [r for r in emu.requests if r.method == "POST"]
    assert len(created) == 1 and created[0].json["background"] is True
    lines = [u["data"]["text/plain"] for u in outputs(ip)[1:-1]]
    assert any("background response queued" in line or "background response in progress" in line
               for line in lines), lines
    assert len(ip.user_ns["r"].files) == 1


def test_background_mode_as_a_session_default_and_off_again(ip, emu):
    emu.background_duration = 0.1
    ip.run_line_magic("imagine", "use --background-mode")
    assert get_session().background_mode is True
    imagine(ip, "--size 256x256", "a lighthouse")
    assert last_body(emu)["background"] is True
    ip.run_line_magic("imagine", "use --background-mode off")
    imagine(ip, "--size 256x256", "a lighthouse")
    assert "background" not in last_body(emu)


def test_background_mode_is_refused_for_gemini(ip, emu):
    with pytest.raises(UsageError, match="background-mode"):
        imagine(ip, "-p gemini --background-mode", "a lighthouse")
    assert not emu.requests


def test_ctrl_c_cancels_a_background_response_on_the_server(ip, emu, ctrl_c_when_in_flight):
    emu.background_duration = 60
    ctrl_c_when_in_flight()
    with pytest.raises(KeyboardInterrupt):
        imagine(ip, "--background-mode --size 256x256", "a lighthouse")
    assert [r for r in emu.requests if r.path.endswith("/cancel")]


# --- Microsoft Foundry agents --------------------------------------------------------------------------


def test_use_foundry_creates_the_agent_version_then_asks_it(ip, emu):
    ip.run_line_magic("imagine", "use foundry --project-endpoint https://res.services.ai.azure.com/api/projects/p "
                                 "--agent painter --image-deployment gpt-image-1 -m gpt-4.1")
    imagine(ip, "--size 256x256 --quality low -o r", "a lighthouse")
    created = [r for r in emu.requests if r.path.endswith("/agents/painter/versions") and r.method == "POST"]
    assert len(created) == 1
    assert created[0].json["definition"]["tools"][0] == {"type": "image_generation", "model": "gpt-image-1",
                                                         "size": "256x256", "quality": "low"}
    asked = [r for r in emu.requests if r.path.endswith("/openai/v1/responses")]
    assert asked[-1].json["agent_reference"] == {"type": "agent_reference", "name": "painter", "version": "1"}
    assert ip.user_ns["r"].files[0].metadata["provider"] == "foundry"
    assert "foundry" in outputs(ip)[0]["data"]["text/plain"]

    # Without -m the agent is used as it is; image options would change it, so they are refused.
    ip.run_line_magic("imagine", "use foundry --agent painter")
    get_session().use(model=None)
    imagine(ip, "", "a second lighthouse")
    assert [r for r in emu.requests if r.path.endswith("/openai/v1/responses")][-1].json["agent_reference"] == {
        "type": "agent_reference", "name": "painter"}
    with pytest.raises(UsageError, match="add -m"):
        imagine(ip, "--size 1024x1024", "a third lighthouse")


def test_foundry_needs_an_agent_name(ip, emu):
    ip.run_line_magic("imagine", "use foundry")
    with pytest.raises(UsageError, match="--agent NAME"):
        imagine(ip, "", "a lighthouse")
    assert not emu.requests


def test_foundry_options_on_another_provider_are_refused_per_cell(ip, emu):
    with pytest.raises(UsageError, match="--agent is a Microsoft Foundry option and openai does not use it"):
        imagine(ip, "-p openai --agent painter", "a lighthouse")
    with pytest.raises(UsageError, match="--project-endpoint is a Microsoft Foundry option and gemini does not"):
        imagine(ip, "-p gemini --project-endpoint https://x/api/projects/p", "a lighthouse")
    assert not emu.requests


@pytest.mark.parametrize(("line", "flag"), [
    ("--project-endpoint notaurl --agent painter", "--project-endpoint"),
    ("--project-endpoint http://res.services.ai.azure.com/api/projects/p --agent painter", "--project-endpoint"),
    ("--project-endpoint https://res.services.ai.azure.com --agent painter", "--project-endpoint"),
    ("--agent my_agent!", "--agent"),
    ("--agent -painter", "--agent"),
])
def test_wrong_foundry_settings_are_refused_by_use(ip, emu, line, flag):
    with pytest.raises(UsageError, match=f"{flag}: ") as info:
        ip.run_line_magic("imagine", f"use foundry {line}")
    assert "\n" not in str(info.value)
    assert get_session().project_endpoint is None and get_session().agent_name is None


def test_use_foundry_before_an_agent_says_what_is_missing(ip):
    shown = ip.run_line_magic("imagine", "use foundry")
    assert "foundry · no agent yet (--agent NAME)" in repr(shown)
    assert "Microsoft Foundry · no agent yet" in get_session().summary()


def test_an_agent_without_the_image_tool_is_named_as_the_likely_cause(ip, emu):
    import asyncio

    from azure.ai.projects.aio import AIProjectClient
    from azure.ai.projects.models import PromptAgentDefinition
    from azure.core.pipeline.transport import AsyncioRequestsTransport

    from nbimagine.emulator import EmulatorCredential

    async def make() -> None:
        async with AIProjectClient(emu.foundry_endpoint, EmulatorCredential(),
                                   transport=AsyncioRequestsTransport()) as project:
            await project.agents.create_version("talker", enforce_https=False,
                                                definition=PromptAgentDefinition(model="gpt-4.1"))

    asyncio.run(make())
    ip.run_line_magic("imagine", "use foundry --agent talker")
    imagine(ip, "", "a lighthouse")
    shown = " ".join(o["data"].get("text/plain", "") for o in outputs(ip))
    assert "no image" in shown and "agent 'talker' answered with text only" in shown
    assert "%imagine use foundry --agent talker -m DEPLOYMENT" in shown


def test_background_mode_with_foundry(ip, emu):
    emu.background_duration = 0.2
    ip.run_line_magic("imagine", "use foundry --agent painter --image-deployment gpt-image-1 -m gpt-4.1")
    imagine(ip, "--background-mode --size 256x256 -o r", "a lighthouse")
    asked = [r for r in emu.requests if r.path.endswith("/openai/v1/responses")]
    assert asked[-1].json["background"] is True and len(ip.user_ns["r"].files) == 1


def test_providers_shows_foundry_credential_sources_by_name_only(ip, monkeypatch):
    secret = "tenant-secret-value-0123456789"
    monkeypatch.setenv("AZURE_AI_PROJECT_ENDPOINT", "https://res.services.ai.azure.com/api/projects/p")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", secret)
    shown = ip.run_line_magic("imagine", "providers")
    text = repr(shown) + shown._repr_mimebundle_()["text/html"]
    assert "AZURE_AI_PROJECT_ENDPOINT" in text and "AZURE_CLIENT_SECRET" in text
    assert secret not in text and "res.services.ai.azure.com" not in text


def test_a_foundry_sign_in_that_fails_mid_request_says_what_to_do_from_the_notebook(ip, emu, monkeypatch):
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
                "IDENTITY_ENDPOINT", "MSI_ENDPOINT", "AZURE_AI_PROJECT_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no az / azd: nothing to sign in with
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")  # developer tools only: no managed identity probe
    ip.run_line_magic("imagine", "emulator off")
    ip.run_line_magic("imagine", f"use foundry --project-endpoint {emu.foundry_endpoint} --agent painter")
    shown = repr(ip.run_line_magic("imagine", "providers"))
    assert re.search(r"\* foundry +sign in\?", shown), shown  # the endpoint alone is not "ready"
    with pytest.raises(UsageError) as info:
        imagine(ip, "", "a lighthouse")
    message = str(info.value)
    assert "az login" in message and "run %imagine emulator on to work offline" in message
    assert "FoundryAgentConfig" not in message and "\n" not in message
    assert not [r for r in emu.requests if r.method == "POST"]
