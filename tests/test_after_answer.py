"""Once a provider has answered, the user gets the images (issue 9), driven through a real shell.

Hostile images come from the emulator's fault families over real HTTP and the real SDKs; history
failures are real (a folder that is a file, a lock held by another process). What is the kernel's
own behaviour (message types, Ctrl-C timings, tracebacks) is in ``test_kernel.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from test_magics import _break_image_folder, final_outputs, image_outputs, imagine, outputs

from nbimagine._images import FULL_DECODE_PIXELS, MAX_PIXELS, image_size, open_reduced
from nbimagine.emulator._hostile import HOSTILE_IMAGES, huge_png
from nbimagine.errors import ImageDecodeError, ImagineWarning, InputError, ProviderError
from nbimagine.events import BinaryResult, ImageInput, read_image_file

ROOT = Path(__file__).resolve().parents[1]


def warning_lines(shell) -> list[str]:
    return [line for o in final_outputs(shell) for line in o["data"].get("text/plain", "").splitlines()
            if line.startswith("ImagineWarning: ")]


# --- hostile images from a provider -----------------------------------------------------------------

# fault -> what the warning beside the image says (the preview cannot be made; the bytes are kept)
_HOSTILE = {"truncated_png": "truncated", "truncated_jpeg": "truncated", "bomb_png": "megapixels",
            "undecodable": "not a PNG, JPEG, WebP or GIF"}
# Every route the emulator serves: the Responses API (OpenAI, Azure, Foundry's project route, a background
# response polled until done), generateContent (Gemini, Vertex) and the Images API (one request for -n).
_PROVIDERS = ["openai", "azure", "foundry", "background", "gemini", "vertex", "images"]


@pytest.fixture
def images_api():
    from nbimagine._session import get_session
    from nbimagine.config import OpenAIImagesConfig

    get_session().register("images", OpenAIImagesConfig(model="gpt-image-1"))
    yield
    get_session()._registered.pop("images", None)


def _route(ip, emu, provider: str) -> tuple[str, dict]:
    """The %%imagine options, and the same as ``Generation`` overrides, that reach ``provider``'s route
    (Foundry and background responses set up)."""
    if provider == "foundry":
        ip.run_line_magic("imagine", "use foundry --agent painter --image-deployment gpt-image-1 -m gpt-4.1")
        return "", {}
    if provider == "background":
        emu.background_duration = 0.1
        return "--background-mode", {"background_mode": "on"}
    return f"-p {provider}", {"provider": provider}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("fault", sorted(_HOSTILE))
def test_a_hostile_image_is_kept_named_and_warned_about(ip, emu, images_api, provider, fault, n):
    from nbimagine._history import history

    line = f"{_route(ip, emu, provider)[0]} -n {n} -o r"
    if fault == "undecodable":  # no image at all: a typed error, raised after the images are shown
        with pytest.raises(ProviderError, match=r"not a PNG, JPEG, WebP or GIF image.*\.files\[\d\] \(text"):
            imagine(ip, line, f"a lighthouse [fault:{fault}]")
    else:
        imagine(ip, line, f"a lighthouse [fault:{fault}]")  # no exception: paid for
    replies = ip.user_ns["r"] if n > 1 and provider != "images" else [ip.user_ns["r"]]
    images = [image for reply in replies for image in reply.files]
    entries = {entry.id: entry for entry in history()}
    assert len(images) == len(entries) == n  # every image bound to -o and recorded, as it came
    assert {image.sha256 for image in images} == {entry.sha256 for entry in entries.values()}
    # Each request carries the fault; the Images API's one request spoils its last image only.
    for image in images[-1:] if provider == "images" else images:
        entry = entries[image.metadata["history_id"]]
        [output] = [o for o in final_outputs(ip) if o["metadata"].get("nbimagine", {}).get("history_id") == entry.id]
        assert "no preview" in output["data"]["text/plain"] and f"#{entry.id}" in output["data"]["text/plain"]
        assert output["metadata"]["nbimagine"]["sha256"] == image.sha256
        # named by its own id (two images may hold the same bytes) with the file that keeps it
        [line] = [w for w in warning_lines(ip) if f"no preview of #{entry.id}:" in w]
        assert _HOSTILE[fault] in line and f"Kept as #{entry.id} ({entry.path})" in line
        assert entry.path.read_bytes() == image.data


@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bytes_that_are_not_an_image_reach_the_python_api_on_a_typed_error(ip, emu, images_api, provider, stream):
    from nbimagine._generate import Generation

    gen = Generation("a lighthouse [fault:undecodable]", overrides=_route(ip, emu, provider)[1])
    with pytest.raises(ProviderError) as info:
        gen.run(on_event=(lambda i, e: None) if stream else None)
    error = info.value
    assert error.code == "undecodable_image" and gen.errors == [error]
    [kept] = [f for f in error.files if f.metadata.get("undecodable")]
    assert kept.data.startswith((b"nbimagine emulator", b"this is not an image"))
    assert kept.media_type == "application/octet-stream" and kept.extension == "bin"
    assert f".files[{error.files.index(kept)}] (text (not an image), {len(kept.data)} B)" in str(error)
    [entry] = [e for e in gen.entries if e.id == kept.metadata["history_id"]]
    assert entry.path.suffix == ".bin" and entry.path.read_bytes() == kept.data
    with pytest.raises(ImageDecodeError, match="not a PNG"):
        kept.to_pil()


# fault -> what the image is: valid but unusual images are previewed, thumbnailed and saved like any other;
# one above the decoding limit is kept and named.
_UNUSUAL = {"tiny_png": (1, 1), "animated_png": (1024, 1024), "cmyk_jpeg": (1024, 1024),
            "gray16_png": (1024, 1024), "large_png": None}


@pytest.mark.parametrize("provider", ["openai", "gemini", "images"])
@pytest.mark.parametrize("fault", sorted(_UNUSUAL))
def test_an_unusual_image_is_shown_thumbnailed_and_saved_like_any_other(ip, emu, images_api, tmp_path, provider,
                                                                       fault):
    from nbimagine._history import history

    imagine(ip, f"-p {provider} -o r", f"a lighthouse [fault:{fault}]")  # no exception: paid for
    [image] = ip.user_ns["r"].files
    [entry] = history()
    assert image.metadata["history_id"] == entry.id and entry.path.read_bytes() == image.data
    [output] = [o for o in final_outputs(ip) if "nbimagine" in o["metadata"]]
    if _UNUSUAL[fault] is None:  # 400 MP: named, never decoded
        assert "no preview" in output["data"]["text/plain"]
        [line] = warning_lines(ip)
        assert "megapixels" in line and f"Kept as #{entry.id}" in line
        return
    assert (image.width, image.height) == _UNUSUAL[fault] and warning_lines(ip) == []
    [kind] = [k for k in output["data"] if k.startswith("image/")]
    from PIL import Image

    shown = Image.open(io.BytesIO(base64.b64decode(output["data"][kind])))
    assert shown.mode in ("RGB", "L", "RGBA", "P") and max(shown.size) <= 768
    if fault == "gray16_png":  # 16 bits scaled to 8, not clipped to white
        assert shown.convert("L").getextrema()[0] < 128
    assert Image.open(io.BytesIO(entry.thumbnail(64))).size[0] <= 64
    for suffix in (".png", ".jpg", ".webp", ".gif"):
        saved = image.save(tmp_path / f"out{suffix}")
        assert Image.open(saved).size == image.to_pil().size
    ip.run_line_magic("imagine", "history")  # the gallery thumbnails it


def test_every_hostile_image_fault_is_listed_with_a_description():
    assert set(HOSTILE_IMAGES) == {*_HOSTILE, *_UNUSUAL, "huge_png"} - {"undecodable"}
    assert all(len(text) > 20 for text in HOSTILE_IMAGES.values())


def test_a_huge_png_is_previewed_in_bounded_memory(ip, emu):
    imagine(ip, "-o r", "a mural [fault:huge_png]")
    [image] = ip.user_ns["r"].files
    assert (image.width, image.height) == (13000, 13000) and len(image.data) < 2_000_000
    [output] = image_outputs(ip)
    preview = base64.b64decode(output["data"]["image/jpeg"])
    assert max(image_size(preview)) <= 768
    assert warning_lines(ip) == []


def test_pngs_decoded_in_bands_match_a_whole_decode():
    from PIL import Image

    from nbimagine._images import _png_in_bands

    for mode in ("RGB", "RGBA", "L", "LA", "P"):
        source = Image.radial_gradient("L").resize((301, 257)).convert(mode if mode != "P" else "RGB")
        if mode == "P":
            source = source.quantize(64)
        buffer = io.BytesIO()
        source.save(buffer, "PNG")  # Pillow's adaptive row filters: every filter type occurs
        data = buffer.getvalue()
        banded = _png_in_bands(data, 301, 257, 400, band_bytes=4096)
        whole = Image.open(io.BytesIO(data)).convert(banded.mode)
        assert banded.tobytes() == whole.tobytes(), mode


def test_bounded_decoding_refuses_with_typed_errors():
    bomb = huge_png(30000, 30000, blank=True)
    with pytest.raises(ImageDecodeError, match="decompression-bomb") as info:
        open_reduced(bomb, 256)
    assert info.value.dimensions == (30000, 30000) and info.value.media_type == "image/png"
    with pytest.raises(ImageDecodeError):
        BinaryResult(bomb).to_pil()
    assert FULL_DECODE_PIXELS < 13000 * 13000 < MAX_PIXELS
    truncated = huge_png(13000, 13000)[:400_000]
    with pytest.raises(ImageDecodeError, match="truncated"):
        open_reduced(truncated, 256)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bytes_never_raise_a_raw_pillow_error(tmp_path, fmt):
    from PIL import Image

    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((600, 400)).convert("RGB").save(buffer, fmt)
    cut = BinaryResult(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])
    with pytest.raises(ImageDecodeError, match="truncated"):
        cut.to_pil()
    with pytest.raises(ImageDecodeError):
        cut.save(tmp_path / ("x.jpg" if fmt == "PNG" else "x.png"))  # a conversion decodes
    assert cut.save(tmp_path / "as-is").read_bytes() == cut.data  # no conversion: the bytes as they are
    assert "truncated" in cut._repr_mimebundle_()["text/plain"]


def test_a_non_integer_partial_index_keeps_the_request_going(ip, emu):
    imagine(ip, "--partial 2 -o r", "a kite [fault:partial_index_not_int]")
    assert ip.user_ns["r"].files
    partial_updates = [o for o in outputs(ip) if o["update"] and "partial" in o["data"]["text/html"]]
    assert "partial 1" in partial_updates[0]["data"]["text/html"]
    assert "partial 2" in partial_updates[-1]["data"]["text/html"]
    assert image_outputs(ip)


# --- the history fails after the answer ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_an_unwritable_image_folder_is_a_warning_beside_the_image(ip, emu, n):
    from nbimagine._history import history

    _break_image_folder(history())
    imagine(ip, f"-n {n} -o r", "a kite")
    replies = ip.user_ns["r"] if n > 1 else [ip.user_ns["r"]]
    assert all(r.files and "history_id" not in r.files[0].metadata for r in replies)
    assert len(image_outputs(ip)) == n
    [line] = warning_lines(ip)  # one line for the cause, counting every image it concerns
    expected = "1 image could not be recorded in the history" if n == 1 else f"{n} images could not be recorded"
    assert expected in line and ("it is shown" if n == 1 else "they are shown") in line


def test_a_history_locked_by_another_process_is_a_warning_beside_the_image(ip, emu, monkeypatch):
    from nbimagine._history import history

    monkeypatch.setenv("NBIMAGINE_HISTORY_BUSY_TIMEOUT", "0.2")  # documented knob: no 30 s wait in a test
    # (read when the history is opened: the first time in this test's folder is just below)
    index = history().path / "index.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sqlite3, sys
            conn = sqlite3.connect({str(index)!r}, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        imagine(ip, "-o r", "a kite")
    finally:
        holder.communicate("done\n", timeout=10)
    assert ip.user_ns["r"].files
    assert image_outputs(ip)
    [line] = warning_lines(ip)
    assert "could not be recorded" in line and "locked" in line


# --- inputs checked before they are read --------------------------------------------------------------


def _read_bytes() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io to count bytes read")
def test_a_3_gb_edit_file_is_refused_before_it_is_read(ip, emu, tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: 3 GB long, nothing on disk
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(3 * 1024**3)
    ip.user_ns["path_var"] = str(big)
    for line in (f"-e {big}", "-e path_var"):
        before = _read_bytes()
        with pytest.raises(UsageError, match=r"3\.0 GB"):
            imagine(ip, line, "make it blue")
        assert _read_bytes() - before < 10 * 1024**2
    with pytest.raises(InputError):
        ImageInput(path=big)
    assert not [r for r in emu.requests if r.method == "POST"]


def test_a_file_larger_than_its_stat_size_is_refused_after_limit_bytes():
    # /proc files report a size of 0 and hold more: the same as a file that grows while read.
    with pytest.raises(InputError, match="grew while being read"):
        read_image_file(Path("/proc/self/maps"), limit=16)


def test_text_that_cannot_be_encoded_is_refused_before_the_request(ip, emu):
    ip.user_ns["name"] = "caf\udce9"  # a lone surrogate, as os.fsdecode gives for a Latin-1 file name
    with pytest.raises(UsageError, match="lone surrogate"):
        imagine(ip, "", "a sign that reads {name}")
    assert not emu.requests
    from nbimagine._generate import Generation

    with pytest.raises(InputError, match="position 3"):
        Generation("caf\udce9")


def test_the_python_api_warns_with_imagine_warning(ip, emu):
    from nbimagine._generate import Generation
    from nbimagine._history import history

    _break_image_folder(history())
    with pytest.warns(ImagineWarning, match="could not be recorded"):
        [reply] = Generation("a kite").run()
    assert reply.files


def test_terminal_ipython_prints_one_progress_line_and_one_caption(tmp_path):
    script = textwrap.dedent("""
        from IPython.terminal.interactiveshell import TerminalInteractiveShell
        shell = TerminalInteractiveShell.instance()
        shell.run_line_magic("load_ext", "nbimagine")
        shell.run_cell_magic("imagine", "--partial 2 -o r", "a fox in the snow")
        print("files:", len(shell.user_ns["r"].files))
    """)
    env = {**os.environ, "NBIMAGINE_EMULATOR": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert sum("Generating" in line for line in lines) == 1
    assert sum(line.startswith("#1 · ") for line in lines) == 1
    assert len(lines) == len(set(lines))  # nothing repeated
    assert lines[-1] == "files: 1"


def test_sqlite_lock_holder_helper_really_locks(tmp_path):
    # Guard for the lock test above: BEGIN EXCLUSIVE on a WAL index blocks writers, not readers.
    path = tmp_path / "x.sqlite"
    a = sqlite3.connect(path, isolation_level=None)
    a.execute("PRAGMA journal_mode=WAL")
    a.execute("CREATE TABLE t(x)")
    a.execute("BEGIN EXCLUSIVE")
    b = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    assert b.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        b.execute("BEGIN IMMEDIATE")
    a.execute("ROLLBACK")


def test_a_failing_progress_display_is_a_warning_and_the_request_goes_on(ip, emu, monkeypatch):
    publisher = ip.display_pub
    original = publisher.publish

    def publish(data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        if update and "Generating" in data.get("text/plain", ""):  # a frontend that breaks on progress
            raise RuntimeError("the frontend went away")
        return original(data, metadata=metadata, source=source, transient=transient, update=update, **kwargs)

    monkeypatch.setattr(publisher, "publish", publish)
    imagine(ip, "--partial 2 -o r", "a kite")
    assert ip.user_ns["r"].files and image_outputs(ip)
    [line] = warning_lines(ip)
    assert "progress display failed" in line and "the frontend went away" in line


# --- Ctrl-C in every phase ------------------------------------------------------------------------------


def test_ctrl_c_while_the_progress_slot_is_drawn_stops_the_request_it_started(ip, emu, monkeypatch):
    # The request is already on its way when the slot is drawn: a Ctrl-C landing there (a frontend's
    # publisher is where the kernel's SIGINT handler raises it) must stop it and say so in one line.
    from nbimagine._history import history

    emu.latency = 0.5
    ip.user_ns.pop("r", None)
    publisher = ip.display_pub
    original = publisher.publish

    def publish(data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        if not update and data.get("text/plain", "").startswith("Generating"):
            raise KeyboardInterrupt
        return original(data, metadata=metadata, source=source, transient=transient, update=update, **kwargs)

    monkeypatch.setattr(publisher, "publish", publish)
    with pytest.raises(KeyboardInterrupt) as info:
        imagine(ip, "-o r", "a kite")
    [line] = info.value._render_traceback_()
    assert "1 request(s) stopped; nothing was recorded" in line
    assert len(history()) == 0 and "r" not in ip.user_ns
    monkeypatch.setattr(publisher, "publish", original)
    emu.latency = 0.0
    imagine(ip, "-o r", "a kite")  # the kernel goes on; the stopped request recorded nothing meanwhile
    assert len(ip.user_ns["r"].files) == 1 and len(history()) == 1


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_a_second_ctrl_c_does_not_cut_short_the_recording_of_what_had_arrived():
    # Impatient users press Ctrl-C twice. The first cancels; the second lands while the cancelled request
    # still records what had arrived: the caller must wait for that, or it reports before it is done.
    import asyncio
    import threading

    from nbimagine._sync import Job

    waiting, unwinding, second = threading.Event(), threading.Event(), threading.Event()
    recorded: list[bool] = []
    presses = 0

    quiet = threading.Event()

    def on_sigint(signum, frame):
        nonlocal presses
        presses += 1
        if presses == 2:
            second.set()
        if not quiet.is_set():
            raise KeyboardInterrupt

    async def request():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            unwinding.set()
            await asyncio.to_thread(second.wait, 30)  # recording, while the second Ctrl-C arrives
            recorded.append(True)
            raise

    def press_twice():
        waiting.wait(30)  # the first lands while the caller waits for the result
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        unwinding.wait(30)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    presser = threading.Thread(target=press_twice, daemon=True)
    try:
        presser.start()
        job = Job(request())
        with pytest.raises(KeyboardInterrupt):
            job.result(on_poll=waiting.set)
        done_on_return = job.done()
    finally:
        # A press that comes late (a loaded machine) is counted here, never raised into a later test.
        quiet.set()
        presser.join(40)
        signal.signal(signal.SIGINT, previous)
    assert presses == 2 and recorded == [True] and done_on_return


# --- inputs refused before the request and its progress slot -------------------------------------------


def test_an_edit_too_large_or_not_an_image_is_refused_before_the_progress_slot(ip, emu):
    from nbimagine._history import history
    from nbimagine.events import MAX_INPUT_BYTES

    ip.user_ns["big"] = bytearray(b"\x89PNG\r\n\x1a\n" + bytes(MAX_INPUT_BYTES))
    with pytest.raises(UsageError, match=r"big holds 50\.0 MB"):
        imagine(ip, "-e big", "make it blue")
    entry = history().add(BinaryResult(b"<html>bad gateway</html>"), prompt="kept bytes")  # e.g. an undecodable
    with pytest.raises(UsageError, match="Unsupported image type"):
        imagine(ip, f"-e #{entry.id}", "make it blue")
    assert outputs(ip) == [] and not emu.requests


def test_control_characters_from_a_provider_are_shown_escaped(ip, emu):
    # The emulator echoes the prompt in the revised prompt: ANSI escapes and a right-to-left override
    # must not recolour a terminal (JupyterLab renders ANSI in text/plain too) or reorder the caption.
    imagine(ip, "-o r", "a sign \x1b[2J\x1b[31mred\u202eevil")
    assert "\x1b" in ip.user_ns["r"].files[0].metadata["revised_prompt"]  # the data is left as it came
    shown = "".join(o["data"].get("text/plain", "") + o["data"].get("text/html", "") for o in final_outputs(ip))
    assert "\x1b" not in shown and "\u202e" not in shown
    assert "\\x1b[31mred\\u202eevil" in shown


@pytest.mark.parametrize("prompt", ["a sad smiley :(", "a cat's hat", 'a """ sign', "a [bracket", "ends with a ;"])
def test_prompts_that_are_not_python_never_fail_the_cell_after_its_images(ip, emu, prompt):
    # IPython's @output_can_be_silenced tokenized the prompt as Python once the magic had run: a raw
    # TokenError after the images (on Python 3.12+ for every apostrophe).
    imagine(ip, "-o r", prompt)
    assert len(ip.user_ns.pop("r").files) == 1
    if '"' not in prompt:  # the magic line is parsed with quotes: an unclosed one is a UsageError before
        ip.run_line_magic("imagine", f"-o r {prompt}")
        assert len(ip.user_ns["r"].files) == 1


def test_a_trailing_semicolon_still_silences_a_subcommand(ip, emu):
    assert ip.run_line_magic("imagine", "history") is not None
    assert ip.run_line_magic("imagine", "history;") is None


# The publish calls of one %%imagine cell with a reply text, in order: the progress slot, its updates,
# then the final outputs. A frontend may fail at any of them.
_PUBLISHES = ["slot", "update", "text", "image", "caption"]


@pytest.mark.parametrize("failing", _PUBLISHES)
def test_a_frontend_failing_at_any_output_never_hides_the_image_or_unbinds_o(ip, emu, monkeypatch, capsys, failing):
    from nbimagine._history import history

    publisher = ip.display_pub
    original = publisher.publish

    def kind(data, update):
        if not update and (data.get("text/plain", "").startswith("Generating")):
            return "slot"
        if update:
            return "update"
        if any(k.startswith("image/") for k in data):
            return "image"
        return "caption" if "text/plain" not in data else "text"

    def publish(data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        if kind(data, update) == failing:
            raise RuntimeError("the frontend went away")
        return original(data, metadata=metadata, source=source, transient=transient, update=update, **kwargs)

    monkeypatch.setattr(publisher, "publish", publish)
    imagine(ip, "-o r", "a kite")  # no exception: the image was paid for
    [image] = ip.user_ns["r"].files
    [entry] = history()
    assert image.metadata["history_id"] == entry.id
    shown = [o for o in outputs(ip) if not o["update"] and any(k.startswith("image/") for k in o["data"])]
    if failing == "image":
        assert not shown and "the images are in r and in the history" in capsys.readouterr().out
    else:
        [output] = shown
        assert output["metadata"]["nbimagine"]["history_id"] == entry.id
    if failing in ("slot", "update"):
        assert any("progress display failed" in o["data"].get("text/plain", "") for o in outputs(ip))


@pytest.mark.parametrize("how", ["full-disk", "read-only-images"])
def test_a_full_disk_or_a_read_only_image_folder_is_a_warning_beside_the_image(tmp_path, how):
    # The cases, on real file systems: a tmpfs filled to the last byte, and images/ bind-mounted
    # read-only (root ignores chmod), in a private mount namespace. The cell shows and binds the image.
    from test_history_recovery import _in_private_mount, _private_mounts_work

    if not _private_mounts_work(tmp_path):
        pytest.skip("unshare (user and mount namespaces) is not available here")
    small = tmp_path / "small"
    small.mkdir()
    result = _in_private_mount(tmp_path, f"mount -t tmpfs -o size=400k tmpfs {small}", f"""
        import json, os, subprocess
        from IPython.core.displaypub import CapturingDisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell
        from histories import make_image
        from nbimagine._history import history, set_notebook
        from nbimagine._session import get_session, set_emulator
        from nbimagine.emulator import Emulator

        os.chdir({str(small)!r})
        set_notebook("nb")
        history().add(make_image(1), prompt="made before")
        if {how!r} == "full-disk":
            for chunk in (65536, 1):
                try:
                    with open("filler-%d" % chunk, "wb") as f:
                        while True:
                            f.write(b"x" * chunk)
                            f.flush()
                except OSError:
                    pass
        else:
            images = os.path.join({str(small)!r}, ".nbimagine", "images")
            subprocess.run(["mount", "--bind", images, images], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", images], check=True)
        with Emulator() as emu:
            shell = InteractiveShell.instance()
            shell.run_line_magic("load_ext", "nbimagine")
            set_emulator(emu)
            get_session().use(emulator=True)
            shell.display_pub = publisher = CapturingDisplayPublisher()
            ran = shell.run_cell("%%imagine -o r\\na kite")
            print(json.dumps({{
                "error": repr(ran.error_in_exec) if ran.error_in_exec else None,
                "files": len(shell.user_ns["r"].files) if "r" in shell.user_ns else None,
                "images": sum(any(k.startswith("image/") for k in o["data"]) for o in publisher.outputs),
                "warnings": [line for o in publisher.outputs for line in o["data"].get("text/plain", "").splitlines()
                             if line.startswith("ImagineWarning: ")],
            }}))
    """)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["error"] is None and seen["files"] == 1 and seen["images"] == 1, seen
    [line] = seen["warnings"]
    cause = "No space left on device" if how == "full-disk" else "Read-only file system"
    assert "could not be recorded in the history" in line and cause in line, line
    if how == "read-only-images":  # named by the file that failed, not by the index
        assert "Cannot store the image files" in line and "/.nbimagine/images)" in line, line
    assert "Traceback" not in result.stdout + result.stderr
