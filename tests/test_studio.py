"""Model tests of the studio (the anywidget gallery), without a browser.

The page's actions are sent exactly as ``static/studio.js`` sends them (custom messages through
``_handle_custom_msg``) and its state is read from the traits it renders. A real session, a real history
in a temporary folder, and generations over HTTP to the real emulator through the real SDKs. The page
itself (click, keyboard, layout) is driven in a real browser by ``test_browser.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from nbimagine._history import History
from nbimagine._session import ImagineSession, get_session, set_emulator
from nbimagine._widgets import STATIC, Studio, StudioView, plain_error, studio
from nbimagine.errors import ConfigError, ContentPolicyError, ProviderError
from nbimagine.events import BinaryResult


@pytest.fixture
def routed(emu):
    """A session answered by the shared test emulator."""
    set_emulator(emu)
    yield ImagineSession(emulator=True)
    set_emulator(None)


@pytest.fixture
def hist(tmp_path) -> History:
    return History(tmp_path, "studio")


def png(i: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    colour = (i % 256, (i // 256) % 256, 120) if mode == "RGB" else (i % 256, 30, 90, 128)
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def seed(history: History, count: int) -> list[int]:
    with history.batch():
        return [history.add(BinaryResult(png(i)), prompt=f"seed image {i}", provider="openai",
                            model="gpt-image-1").id for i in range(count)]


def act(st: Studio, action: str, **content) -> None:
    """What the page sends for a click or a key."""
    st.view._handle_custom_msg({"action": action, **content}, [])


def generate(st: Studio, prompt: str, *, edit: bool = False, timeout: float = 20) -> None:
    st.view.prompt = prompt
    act(st, "edit" if edit else "generate")
    assert st.wait(timeout)


def decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --- the front end ships inside the package ---------------------------------------------------------


def test_es_module_and_css_ship_as_package_files():
    esm, css = STATIC / "studio.js", STATIC / "studio.css"
    assert esm.is_file() and css.is_file()
    source = esm.read_text()
    assert "export default { render }" in source
    assert "innerHTML" not in source  # provider and prompt text only ever as textContent
    view = StudioView()
    assert view._esm == source and view._css == css.read_text()
    # Every action the page sends is one the kernel handles.
    sent = set(re.findall(r'action: "(\w+)"', source))
    assert sent == {"generate", "edit", "cancel", "page", "refresh", "open", "close", "compare", "save", "mask",
                    "unmask"}
    view.close()


def test_a_wheel_would_carry_the_static_files():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["nbimagine"]
    assert "static/*.js" in data and "static/*.css" in data
    assert any(dep.startswith("anywidget") for dep in pyproject["project"]["dependencies"])


# --- display: the live widget, then a static copy for saved notebooks -------------------------------


def test_display_is_the_live_widget_then_a_static_copy(routed, hist):
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    seed(hist, 3)
    st = studio(routed, hist, settings=False)
    shell = InteractiveShell.instance()
    publisher, saved = CapturingDisplayPublisher(), shell.display_pub
    shell.display_pub = publisher
    try:
        st._ipython_display_()
        live, copy = publisher.outputs
        assert "application/vnd.jupyter.widget-view+json" in live["data"]
        assert "VBox(" not in live["data"]["text/plain"] and "nbimagine studio" in live["data"]["text/plain"]
        html = copy["data"]["text/html"]
        sid = st.snapshot_id
        assert f'data-nbi-snapshot="{sid}"' in html and html.count("<img") == 3
        assert "#3" in html and "seed image 2" in html and "run the cell" in html
        # Its own style hides the "model not found" line of the widget output before it, once that is dead.
        assert f'.jp-OutputArea-child:has(> .jp-OutputArea-output.jupyter-widgets):has(+ .jp-OutputArea-child ' \
               f'[data-nbi-snapshot="{sid}"])' in html
        assert copy["transient"]["display_id"]
        seed(hist, 1)
        generate_done = len(publisher.outputs)
        st._update_snapshot()  # what a finished generation does
        update = publisher.outputs[generate_done]
        assert update["update"] and update["data"]["text/html"].count("<img") == 4
    finally:
        shell.display_pub = saved
        st.close()


def test_the_copy_escapes_prompts_and_shows_the_newest(routed, hist):
    hist.add(BinaryResult(png(1)), prompt='<script>alert("x")</script> & more')
    seed(hist, 14)
    st = Studio(routed, hist, settings=False)
    snapshot = st.snapshot()
    assert "<script>alert" not in snapshot["text/html"] and "&lt;script&gt;" not in snapshot["text/plain"]
    assert snapshot["text/html"].count("<img") == 12 and "newest 12 shown" in snapshot["text/html"]
    st.close()


# --- generating --------------------------------------------------------------------------------------


def test_generate_shows_progress_in_place_then_the_result_and_selects_it(routed, hist, emu):
    emu.latency = 0.5
    st = Studio(routed, hist)
    assert st.view.items == [] and st.view.total == 0
    st.view.prompt = "a blue whale"
    act(st, "generate")
    assert st.running and st.view.activity["label"] == "Generating" and st.view.result == {}
    assert st.wait(15)
    assert not st.running and st.view.activity == {}
    assert st.view.status == {"kind": "done", "text": st.view.status["text"]}
    assert st.view.status["text"].startswith("Done in") and st.view.error == ""
    result = st.view.result
    head = result["lines"][0]
    assert result["id"] == 1 and "#1" in head and "openai/gpt-4.1" in head and "1024x1024" in head
    assert result["lines"][1] == "a blue whale"
    assert decoded(result["src"]).size == (768, 768)
    assert st.view.total == 1 and [i["id"] for i in st.view.items] == [1]
    assert st.selected == [1]  # the new image is what Save and Edit selected work on
    st.close()


def test_partials_replace_the_previous_result_while_running(routed, hist, emu):
    st = Studio(routed, hist, settings=False)
    generate(st, "a first picture")
    assert st.view.result["id"] == 1
    routed.use(partial_images=2)
    emu.stream_delay = 0.15
    partials: list[str] = []
    results: list[dict] = []
    st.view.observe(lambda ch: partials.extend(ch["new"].get("partials") or []), names="activity")
    st.view.observe(lambda ch: results.append(ch["new"]), names="result")
    generate(st, "a lighthouse")
    assert len(partials) == 2 and all(max(decoded(u).size) <= 384 for u in partials)
    # The previous result left the stage when the run started, not when it ended.
    assert results[0] == {} and results[-1]["id"] == 2
    st.close()


def test_retries_are_shown_in_the_status(routed, hist, emu):
    emu.inject("http", status=503, times=1, retry_after=0.01)
    st = Studio(routed, hist, settings=False)
    notes: list[str] = []
    st.view.observe(lambda ch: notes.append(ch["new"].get("note", "")), names="activity")
    generate(st, "a storm")
    assert "retrying (1/2) after HTTP 503" in notes and st.view.status["kind"] == "done"
    st.close()


def test_the_embedded_panel_sets_what_is_sent(routed, hist, emu):
    st = Studio(routed, hist)
    st.settings.provider.value = "gemini"
    st.settings.aspect_ratio.value = "16:9"
    assert "Gemini" in st.view.summary and "aspect_ratio=16:9" in st.view.summary
    generate(st, "a wide valley")
    entry = hist.get(1)
    assert entry.provider == "gemini" and entry.params == {"aspect_ratio": "16:9"}
    assert entry.width > entry.height and "gemini/" in st.view.result["lines"][0]
    st.close()


def test_an_empty_prompt_says_only_that(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a cat [error:500]")
    assert st.view.status["kind"] == "failed"
    st.view.prompt = "   "
    act(st, "generate")
    assert st.view.error == "Write a prompt first." and st.view.status == {}  # no stale "Failed after"
    assert not st.running and len(hist) == 0
    st.close()


def test_a_provider_error_is_one_line_and_the_studio_stays_usable(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a cat [error:500]")
    message = st.view.error
    assert message.startswith("[openai, HTTP 500]") and "try again" in message and "\n" not in message
    assert "ProviderError" not in message and "Traceback" not in message
    assert st.view.status["text"].startswith("Failed after") and st.view.result == {}
    generate(st, "a cat")
    assert st.view.error == "" and len(hist) == 1 and st.view.status["kind"] == "done"
    st.close()


def test_a_content_policy_refusal_is_explained(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "something [fault:moderation]")
    assert "safety system refused" in st.view.error and "rephrase" in st.view.error
    st.close()


def test_missing_key_points_at_the_panel(hist, emu):
    st = Studio(ImagineSession(), hist)  # no emulator, no keys (conftest removes them)
    st.view.prompt = "a cat"
    act(st, "generate")
    message = st.view.error
    assert "OPENAI_API_KEY" in message and message.count("getpass.getpass()") == 1
    assert "Offline emulator" in message and "%imagine" not in message
    assert not st.running and emu.requests == []
    st.close()


def test_invalid_settings_are_refused_before_starting(hist, routed):
    st = Studio(routed, hist)
    routed.provider = "nonexistent"  # set directly, bypassing use(): the studio must still cope
    assert "Unknown provider" in st.view.summary
    st.view.prompt = "a cat"
    act(st, "generate")
    assert "Unknown provider" in st.view.error and not st.running
    routed.provider = "openai"
    st.close()


def test_cancel_stops_the_request_and_clears_the_stage(routed, hist, emu):
    st = Studio(routed, hist, settings=False)
    generate(st, "a quick sketch")
    assert st.view.result["id"] == 1
    emu.latency = 20
    st.view.prompt = "a slow painting"
    act(st, "generate")
    wait_for(lambda: len([r for r in emu.requests if r.method == "POST"]) == 2, 10)
    act(st, "cancel")
    assert st.wait(10)
    assert st.view.status["kind"] == "cancelled" and "nothing was recorded" in st.view.status["text"]
    assert st.view.result == {}  # the old image does not stay under "Cancelled"
    assert len(hist) == 1
    wait_for(lambda: emu.state.aborted >= 1, 5)  # the emulator saw the client go away
    st.close()


def test_generate_is_ignored_while_running(routed, hist, emu):
    emu.latency = 0.5
    st = Studio(routed, hist, settings=False)
    st.view.prompt = "one image"
    first = st.start()
    assert first is not None and st.start() is None  # a second click (e.g. a stale browser view)
    assert st.wait(15)
    assert len(hist) == 1
    st.close()


def test_edit_selected_sends_the_selection_and_moves_the_selection_to_the_result(routed, hist, emu):
    st = Studio(routed, hist, settings=False)
    generate(st, "a red fox")
    generate(st, "a grey wolf")
    assert [i["id"] for i in st.view.items] == [2, 1]
    st.view.selected = [1, 2]  # the page's clicks
    emu.requests.clear()
    generate(st, "put them in one picture", edit=True)
    body = [r for r in emu.requests if r.method == "POST"][-1].json
    content = body["input"][-1]["content"]
    assert len([p for p in content if p.get("type") == "input_image"]) == 2
    entry = hist.get(3)
    assert entry.parents == (1, 2) and [e.id for e in hist.lineage(3)] == [1, 2, 3]
    assert "edited from #1, #2" in st.view.result["lines"][0]
    assert st.selected == [3]  # Save now saves the edit, not its sources
    st.close()


def test_edit_without_a_selection_is_refused(routed, hist):
    st = Studio(routed, hist, settings=False)
    st.view.prompt = "make it blue"
    act(st, "edit")
    assert "Select one or more images" in st.view.error and not st.running
    st.close()


# --- the gallery -------------------------------------------------------------------------------------


def test_gallery_pages_and_clamps(routed, hist):
    seed(hist, 60)
    st = Studio(routed, hist, per_page=24, settings=False)
    ids = lambda: [i["id"] for i in st.view.items]  # noqa: E731
    assert ids() == list(range(60, 36, -1)) and (st.view.page, st.view.pages) == (0, 3)
    act(st, "page", page=1)
    assert ids() == list(range(36, 12, -1))
    act(st, "page", page=2)
    assert ids() == list(range(12, 0, -1))
    act(st, "page", page=99)
    assert st.page == 2
    thumb = decoded(st.view.items[0]["thumb"])
    assert max(thumb.size) <= 192 and thumb.format == "JPEG"
    assert st.view.items[0]["prompt"] == "seed image 11"
    st.close()


def test_a_missing_image_file_does_not_break_the_gallery(routed, hist):
    ids = seed(hist, 2)
    hist.get(ids[0]).path.unlink()  # deleted by hand, or by another tool
    st = Studio(routed, hist, settings=False)
    items = {i["id"]: i for i in st.view.items}
    assert set(items) == set(ids) and items[ids[1]]["thumb"] and items[ids[0]]["thumb"] is None
    act(st, "open", id=ids[0])
    assert st.view.detail["id"] == ids[0] and st.view.detail["src"] is None
    st.close()


def test_transparent_images_get_png_thumbnails(routed, hist):
    hist.add(BinaryResult(png(1, mode="RGBA")), prompt="glass")
    st = Studio(routed, hist, settings=False)
    assert st.view.items[0]["thumb"].startswith("data:image/png;base64,")
    st.close()


def test_selection_survives_paging(routed, hist):
    seed(hist, 30)
    st = Studio(routed, hist, per_page=10, settings=False)
    st.view.selected = [30, 18]
    act(st, "page", page=1)
    act(st, "page", page=0)
    assert st.selected == [30, 18]
    st.set_selection([])
    assert st.view.selected == []
    st.close()


def test_the_gallery_picks_up_images_made_elsewhere(routed, hist):
    st = Studio(routed, hist, settings=False)
    seed(hist, 3)
    assert st.view.total == 0
    act(st, "refresh")
    assert st.view.total == 3 and st.view.items[0]["id"] == 3
    st.close()


def test_a_history_of_1000_opens_on_its_first_page(routed, hist):
    seed(hist, 1000)
    st = Studio(routed, hist, settings=False)
    assert [i["id"] for i in st.view.items] == list(range(1000, 976, -1)) and st.view.pages == 42
    st.close()


def fox_and_its_edit(st: Studio) -> None:
    """#1 a red fox, #2 the same with a scarf (edited from #1), then the details of #2 opened."""
    generate(st, "a red fox")
    generate(st, "give it a scarf", edit=True)
    act(st, "open", id=2)


def test_details_show_every_fact_and_the_lineage(routed, hist):
    st = Studio(routed, hist, settings=False)
    fox_and_its_edit(st)
    detail = st.view.detail
    meta = dict(detail["meta"])
    assert detail["id"] == 2 and detail["prompt"] == "give it a scarf" and detail["parents"] == [1]
    for key in ("provider", "model", "size", "format", "bytes", "created", "edited from", "revised prompt",
                "sha256"):
        assert meta.get(key), key
    assert meta["edited from"] == "#1" and meta["sha256"] == hist.get(2).sha256
    assert [step["id"] for step in detail["lineage"]] == [1, 2]
    assert all(step["thumb"].startswith("data:image/") for step in detail["lineage"])
    assert max(decoded(detail["src"]).size) == 768
    act(st, "close")
    assert st.view.detail == {} and st.view.compare == {}
    st.close()


def test_compare_an_edit_and_its_source(routed, hist):
    st = Studio(routed, hist, settings=False)
    fox_and_its_edit(st)
    act(st, "compare", ids=[1, 2])  # "Compare with #1" in the details
    pair = st.view.compare
    assert st.view.detail == {}  # one panel at a time
    assert (pair["left"]["id"], pair["right"]["id"]) == (1, 2)
    assert "edited from #1" in pair["right"]["lines"][0] and pair["left"]["lines"][1] == "a red fox"
    assert pair["left"]["src"] != pair["right"]["src"]
    st.close()


def test_a_malformed_message_is_reported_not_raised(routed, hist):
    st = Studio(routed, hist, settings=False)
    act(st, "open", id="not a number")
    assert "could not do 'open'" in st.view.error
    st.view._handle_custom_msg(["not", "a", "dict"], [])
    act(st, "no-such-action")
    st.close()


# --- saving ------------------------------------------------------------------------------------------


def test_save_writes_the_full_image_with_the_export_name(routed, hist, tmp_path):
    big = BinaryResult(png(7, size=(1200, 900)))
    hist.add(big, prompt="Put a tiny beret on the cat!")
    st = Studio(routed, hist, settings=False)
    st.view.selected = [1]
    st.view.save_path = str(tmp_path / "saved") + "/"
    act(st, "save")
    saved = tmp_path / "saved" / "1-put-a-tiny-beret-on-the-cat.png"  # the name %imagine export gives
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == big.sha256  # full size, not the thumbnail
    assert st.view.save_feedback["kind"] == "ok" and str(tmp_path / "saved") in st.view.save_feedback["text"]
    act(st, "save")  # again: the same image is not copied twice
    assert "already there" in st.view.save_feedback["text"] and len(list((tmp_path / "saved").iterdir())) == 1
    (tmp_path / "saved" / "1-put-a-tiny-beret-on-the-cat.png").write_bytes(b"another file")
    act(st, "save")  # the name now holds another file: a new name, never a silent overwrite
    assert (tmp_path / "saved" / "1-put-a-tiny-beret-on-the-cat-2.png").read_bytes() == big.data
    assert "is taken: saved as 1-put-a-tiny-beret-on-the-cat-2.png" in st.view.save_feedback["text"]
    assert (tmp_path / "saved" / "1-put-a-tiny-beret-on-the-cat.png").read_bytes() == b"another file"
    st.close()


def test_save_never_overwrites_silently_and_says_so_in_words(routed, hist, tmp_path):
    seed(hist, 1)
    st = Studio(routed, hist, settings=False)
    st.view.selected = [1]
    target = tmp_path / "windmill.png"
    target.write_bytes(b"the user's own file")
    st.save_selected(str(target))
    feedback = st.view.save_feedback
    assert feedback["kind"] == "error" and "already exists" in feedback["text"] and "overwrite" in feedback["text"]
    assert "Errno" not in feedback["text"] and target.read_bytes() == b"the user's own file"
    st.view.overwrite = True
    st.save_selected(str(target))
    assert st.view.save_feedback["kind"] == "ok" and target.read_bytes() == hist.get(1).image.data
    st.close()


def test_save_rules(routed, hist, tmp_path):
    st = Studio(routed, hist, settings=False)
    act(st, "save")
    assert "Select the image(s) to save" in st.view.save_feedback["text"]  # never "the shown image"
    seed(hist, 2)
    act(st, "refresh")
    st.view.selected = [1]
    st.view.save_path = ""
    act(st, "save")
    assert "Type where to save" in st.view.save_feedback["text"]
    st.view.selected = [1, 2]
    st.view.save_path = str(tmp_path / "one.png")
    act(st, "save")
    assert "give a folder" in st.view.save_feedback["text"] and not (tmp_path / "one.png").exists()
    st.view.save_path = str(tmp_path / "both") + "/"
    act(st, "save")
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["1-seed-image-0.png", "2-seed-image-1.png"]
    assert st.view.save_feedback["kind"] == "ok" and "2 images" in st.view.save_feedback["text"]
    (tmp_path / "blocker").write_text("a file, not a folder")
    st.view.save_path = str(tmp_path / "blocker" / "x") + "/"
    act(st, "save")
    feedback = st.view.save_feedback
    assert feedback["kind"] == "error" and "Errno" not in feedback["text"] and "blocker" in feedback["text"]
    st.close()


@pytest.mark.parametrize(("typed", "fragment"), [
    ("a\x00b.png", "holds a character no file name can hold"),
    ("x" * 300 + ".png", "a name in it is too long"),
    ("x" * 300 + "/", "a name in it is too long"),
    ("taken.png/", "is a file, not a folder"),  # a file where the folder should be: not "tick overwrite"
])
def test_a_path_that_cannot_be_used_is_said_beside_save(routed, hist, tmp_path, typed, fragment):
    seed(hist, 1)
    (tmp_path / "taken.png").write_bytes(b"the user's file")
    st = Studio(routed, hist, settings=False)
    st.view.selected = [1]
    st.view.save_path = f"{tmp_path}/{typed}"  # not a Path: it would drop the trailing /
    act(st, "save")  # through the page's message, as the Save button sends it
    feedback = st.view.save_feedback
    assert feedback["kind"] == "error" and fragment in feedback["text"], feedback
    assert "Errno" not in feedback["text"] and "\n" not in feedback["text"] and not st.view.error
    assert (tmp_path / "taken.png").read_bytes() == b"the user's file"
    st.close()


def test_save_never_writes_through_a_symlink_inside_the_folder(routed, hist, tmp_path):
    seed(hist, 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.png"
    victim.write_bytes(b"not yours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "1-seed-image-0.png").symlink_to(victim)  # the export name, planted as a link
    st = Studio(routed, hist, settings=False)
    st.view.selected = [1]
    st.view.save_path = str(out) + "/"
    act(st, "save")
    assert victim.read_bytes() == b"not yours"
    assert "saved as 1-seed-image-0-2.png" in st.view.save_feedback["text"]
    st.view.overwrite = True
    act(st, "save")  # overwrite replaces the link itself, never the file it points to
    assert victim.read_bytes() == b"not yours" and not (out / "1-seed-image-0.png").is_symlink()
    assert (out / "1-seed-image-0.png").read_bytes() == hist.get(1).image.data
    st.close()


def test_save_as_jpeg_flattens_transparency_onto_white(routed, hist, tmp_path):
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    hist.add(BinaryResult(buffer.getvalue()), prompt="transparent logo")
    st = Studio(routed, hist, settings=False)
    st.view.selected = [1]
    [path] = st.save_selected(str(tmp_path / "logo.jpg"))
    saved = Image.open(path)
    assert saved.format == "JPEG" and min(saved.convert("RGB").getpixel((20, 20))) > 245
    assert "flattened onto white" in st.view.save_feedback["text"]
    st.close()


# --- session and threads -----------------------------------------------------------------------------


def test_summary_follows_the_session(routed, hist):
    st = Studio(routed, hist, settings=False)
    assert "OpenAI · gpt-4.1" in st.view.summary and "offline emulator" in st.view.summary
    routed.use("vertex", image_size="2K")
    assert "Vertex AI · gemini-3.1-flash-image" in st.view.summary and "image_size=2K" in st.view.summary
    st.close()
    routed.use("openai")
    assert "Vertex AI" in st.view.summary  # closed: no longer follows


def test_background_updates_run_on_the_studio_thread(routed, hist, emu):
    """Inside a running loop (as in a kernel) every trait change is made on the loop's own thread."""
    routed.use(partial_images=2)
    emu.stream_delay = 0.1
    main = threading.get_ident()
    changes: list[tuple[str, int]] = []

    async def scenario() -> Studio:
        st = Studio(routed, hist, settings=False)
        for name in ("activity", "status", "result", "items", "running", "selected"):
            st.view.observe(lambda ch, name=name: changes.append((name, threading.get_ident())), names=name)
        st.view.prompt = "a harbour at night"
        act(st, "generate")
        while st.running:
            await asyncio.sleep(0.02)
        return st

    st = asyncio.run(scenario())
    assert {"activity", "status", "result", "items", "running", "selected"} <= {name for name, _ in changes}
    assert [(name, ident) for name, ident in changes if ident != main] == []
    assert st.view.status["kind"] == "done"
    st.close()


def test_without_a_loop_updates_are_applied_under_the_lock(routed, hist, emu):
    routed.use(partial_images=1)
    st = Studio(routed, hist, settings=False)
    held: list[bool] = []
    st.view.observe(lambda ch: held.append(st._lock._is_owned()), names=["activity", "result"])
    generate(st, "a kite")
    assert held and all(held)
    st.close()


def test_plain_error_wording():
    assert plain_error(ConfigError("bad size")) == "bad size"
    assert "safety system refused this request (sexual)" in plain_error(
        ContentPolicyError("blocked", reason="sexual"))
    assert plain_error(ProviderError("boom", provider="openai", status=502)) == "[openai, HTTP 502] boom"
    assert "key *** leaked" in plain_error(RuntimeError("key sk-abcdefghijklmnop leaked"))
    assert plain_error(KeyError("no image #9")) == "no image #9"
    assert plain_error(FileExistsError(17, "File exists", "out/a.png")) == (
        "out/a.png already exists: tick overwrite, or choose another name")
    assert plain_error(OSError(28, "No space left on device", "out/a.png")) == (
        "Cannot write out/a.png: no space left on device")


def test_studio_factory_uses_the_shared_session(hist):
    st = studio(history=hist, settings=False)
    assert st.session is get_session()
    st.close()


def test_the_studio_writes_nothing_by_itself(hist, tmp_path):
    before = set(Path(tmp_path).rglob("*"))
    st = Studio(ImagineSession(), hist, settings=False)
    st.close()
    assert set(Path(tmp_path).rglob("*")) == before


def test_the_studio_shows_images_the_history_could_not_record(routed, hist):
    import shutil

    shutil.rmtree(hist.path / "images", ignore_errors=True)
    (hist.path / "images").write_bytes(b"not a folder")  # every image write fails, even as root
    st = Studio(routed, hist, settings=False)
    generate(st, "a kite", timeout=30)
    assert st.view.status["kind"] == "done" and len(hist) == 0
    assert "could not be recorded in the history" in st.view.error
    assert st.view.result["src"] and st.view.result["id"] is None and "a kite" in st.view.result["lines"]
    st.close()


def test_the_studio_names_an_image_it_cannot_preview(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a kite [fault:truncated_png]", timeout=30)
    assert st.view.status["kind"] == "done" and len(hist) == 1
    assert "No preview" in st.view.error and "truncated" in st.view.error
    assert st.view.result["src"] is None and f"#{hist[-1].id}" in st.view.result["lines"][0]
    assert "PNG" in st.view.result["lines"][0]
    st.close()


def test_the_studio_shows_every_message_of_an_answer_that_is_not_an_image(routed, hist):
    st = Studio(routed, hist, settings=False)
    generate(st, "a kite [fault:undecodable]", timeout=30)
    assert st.view.status["kind"] == "failed" and len(hist) == 1 and hist[-1].ext == "bin"  # kept, as it came
    # the error names the bytes, and the missing preview is said too: neither hides the other
    assert "undecodable_image" in st.view.error and "No preview" in st.view.error
    st.close()


def test_import_nbimagine_stays_light():
    import subprocess
    import sys

    code = ("import sys, nbimagine; assert 'ipywidgets' not in sys.modules and 'anywidget' not in sys.modules; "
            "assert 'nbimagine._widgets' not in sys.modules; nbimagine.studio; "
            "assert 'anywidget' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_a_background_response_shows_its_status(routed, hist, emu):
    emu.background_duration = 0.3
    routed.use(background_mode=True)
    st = Studio(routed, hist, settings=False)
    notes: list[str] = []
    st.view.observe(lambda ch: notes.append(ch["new"].get("note", "")), names="activity")
    generate(st, "a slow harbour", timeout=30)
    assert any(note.startswith("background response") for note in notes) and st.view.status["kind"] == "done"
    st.close()


def test_cancel_of_a_background_response_cancels_it_on_the_server(routed, hist, emu):
    emu.background_duration = 60
    routed.use(background_mode=True)
    st = Studio(routed, hist, settings=False)
    st.view.prompt = "a slow harbour"
    act(st, "generate")
    wait_for(lambda: any(r.method == "POST" and r.path.endswith("/responses") for r in emu.requests), 20)
    act(st, "cancel")
    assert st.wait(20)
    wait_for(lambda: any(r.path.endswith("/cancel") for r in emu.requests), 20)
    assert st.view.status["kind"] == "cancelled" and st.view.result == {} and len(hist) == 0
    st.close()
