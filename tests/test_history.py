"""The per-notebook image history: real files, real SQLite, real processes (no mocks)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import timezone
from pathlib import Path

import pytest
from histories import make_image
from IPython.core.error import UsageError
from PIL import Image

from nbimagine import _history
from nbimagine._history import History, HistoryEntry, history, notebook_name, set_notebook
from nbimagine.errors import HistoryError
from nbimagine.events import BinaryResult

SRC = str(Path(__file__).resolve().parents[1] / "src")


pytestmark = pytest.mark.usefixtures("fresh_history")


@pytest.fixture
def h(tmp_path: Path):
    with History(tmp_path, "demo") as hist:
        yield hist


def test_add_and_read_back(h: History, tmp_path: Path) -> None:
    img = make_image(1, revised_prompt="A cheerful AXOLOTL", api_key="sk-secret", usage={"output_tokens": 5})
    e = h.add(img, prompt="an axolotl", params={"size": "1024x1024", "Authorization": "Bearer x"}, text="Here")
    assert isinstance(e, HistoryEntry)
    assert e.id == 1 and e.ref == "#1"
    assert (e.provider, e.model) == ("openai", "gpt-image-1")  # taken from the image's metadata
    assert (e.width, e.height, e.media_type) == (32, 24, "image/png")
    assert e.size_bytes == len(img.data) and e.sha256 == img.sha256
    assert e.path == h.path / "images" / e.sha256[:2] / f"{e.sha256}.png"
    assert e.path.read_bytes() == img.data
    assert e.created_at.tzinfo == timezone.utc
    assert e.params == {"size": "1024x1024"}  # credentials dropped
    assert "api_key" not in e.metadata and e.metadata["usage"] == {"output_tokens": 5}
    assert e.revised_prompt == "A cheerful AXOLOTL" and e.text == "Here"
    assert h.path == tmp_path / ".nbimagine" and e.notebook == "demo"
    assert (h.path / "index.sqlite").exists()
    record = json.loads((h.path / "records" / "0000" / "1.json").read_text())
    assert record["id"] == 1 and record["notebook"]["name"] == "demo" and record["prompt"] == "an axolotl"
    assert record["sha256"] == e.sha256 and record["params"] == {"size": "1024x1024"}
    # nothing secret reaches the disk at all
    raw = b"".join(p.read_bytes() for p in h.path.rglob("*") if p.is_file())
    assert b"sk-secret" not in raw and b"Bearer x" not in raw

    got = h.get(1)
    assert got == e
    image = got.image
    assert image.data == img.data and image.metadata["history_id"] == 1
    assert image.metadata["provider"] == "openai" and image.width == 32

    with pytest.raises(KeyError, match=r"no image #99 in the image history of .*notebook 'demo' has 1 image"):
        h.get(99)
    assert h.get("#1") == e and 1 in h and 99 not in h


def test_positions_slices_latest_page(h: History) -> None:
    entries = [h.add(make_image(i), prompt=f"prompt {i}") for i in range(30)]
    assert len(h) == 30 and bool(h)
    assert h[0] == entries[0] and h[-1] == entries[-1] and h[-30] == entries[0]
    with pytest.raises(IndexError):
        h[30]
    with pytest.raises(IndexError):
        h[-31]
    with pytest.raises(TypeError):
        h["x"]  # type: ignore[call-overload]
    assert h[2:5] == entries[2:5]
    assert h[-3:] == entries[-3:]
    assert h[::7] == entries[::7]
    assert h[::-1] == entries[::-1]
    assert h[5:2] == []
    assert [e.id for e in h.latest(5)] == [30, 29, 28, 27, 26]
    assert len(h.latest()) == 30
    assert [e.id for e in h.page(0, per_page=24)] == list(range(30, 6, -1))
    assert [e.id for e in h.page(1, per_page=24)] == list(range(6, 0, -1))
    assert h.page(2, per_page=24) == []
    assert h.page_count(24) == 2
    assert list(h) == entries


def test_search_is_case_insensitive_over_prompt_and_revised(h: History) -> None:
    a = h.add(make_image(1), prompt="An Axolotl in a teacup")
    h.add(make_image(2), prompt="a red fox")
    c = h.add(make_image(3, revised_prompt="A pink AXOLOTL swimming"), prompt="amphibian")
    d = h.add(make_image(4), prompt="STRASSE mit Straße")
    assert [e.id for e in h.search("axolotl")] == [c.id, a.id]
    assert h.search("AXOLOTL IN") == [a]
    assert h.search("nothing like this") == []
    assert d in h.search("strasse")  # Unicode case folding, not just ASCII
    assert h.search("50%_") == []  # no LIKE wildcards


def test_lineage_and_children(h: History) -> None:
    a = h.add(make_image(1), prompt="a")
    b = h.add(make_image(2), prompt="b", parents=[a.id])
    c = h.add(make_image(3), prompt="c")
    d = h.add(make_image(4), prompt="d", parents=[b, "#3", b.id])  # mixed refs, duplicate dropped
    e = h.add(make_image(5), prompt="e", parents=[d.id, a.id])
    assert d.parents == (b.id, c.id)
    assert [x.id for x in h.lineage(e.id)] == [a.id, b.id, c.id, d.id, e.id]
    assert h.lineage(a.id) == [a]
    assert h.children(a.id) == [b, e]
    assert h.children(d) == [e]
    assert h.children(e.id) == []
    with pytest.raises(KeyError, match="#77"):
        h.add(make_image(6), prompt="f", parents=[77])
    with pytest.raises(KeyError):
        h.lineage(77)
    assert len(h) == 5  # the failed add recorded nothing


def test_persists_across_instances(tmp_path: Path) -> None:
    with History(tmp_path, "nb") as first:
        a = first.add(make_image(1), prompt="one", params={"quality": "high"})
        first.add(make_image(2), prompt="two", parents=[a.id])
    # a "kernel restart": a new process would do exactly this
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {SRC!r})
            from nbimagine._history import History
            h = History({str(tmp_path)!r}, "nb")
            e = h[-1]
            same = e.image.data == e.path.read_bytes()
            print(json.dumps([len(h), e.prompt, list(e.parents), dict(h[0].params), same]))
        """)],
        capture_output=True, text=True, check=True, timeout=30,
    )
    assert json.loads(out.stdout) == [2, "two", [1], {"quality": "high"}, True]
    with History(tmp_path, "nb") as again:
        assert again.get(1) == a
        assert again.add(make_image(3), prompt="three").id == 3


def test_duplicate_images_share_one_file(h: History) -> None:
    img = make_image(5)
    a = h.add(img, prompt="first")
    mtime = a.path.stat().st_mtime_ns
    b = h.add(img, prompt="second")
    assert a.id != b.id and a.path == b.path
    assert a.path.stat().st_mtime_ns == mtime  # not rewritten
    assert len(list((h.path / "images").rglob("*.png"))) == 1


def test_formats_and_thumbnails(h: History) -> None:
    jpeg = h.add(make_image(1, "JPEG", size=(600, 300)), prompt="jpeg")
    webp = h.add(make_image(2, "WEBP", size=(100, 400)), prompt="webp")
    clear = h.add(make_image(3, "PNG", size=(300, 300), alpha=True), prompt="transparent")
    opaque_rgba = h.add(make_image(4, "PNG", size=(50, 50), alpha=True, ), prompt="opaque")
    assert jpeg.path.suffix == ".jpg" and webp.path.suffix == ".webp"

    thumb = jpeg.thumbnail(192)
    cached = h.path / "thumbs" / f"{jpeg.sha256}_192.jpg"
    assert cached.exists() and cached.read_bytes() == thumb
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == "JPEG" and im.size == (192, 96)
    mtime = cached.stat().st_mtime_ns
    time.sleep(0.01)
    assert jpeg.thumbnail(192) == thumb
    assert h.get(jpeg.id).thumbnail() == thumb  # a fresh entry object also hits the cache
    assert cached.stat().st_mtime_ns == mtime  # not re-rendered

    with Image.open(io.BytesIO(webp.thumbnail(64))) as im:
        assert im.size == (16, 64)
    with Image.open(io.BytesIO(clear.thumbnail(100))) as im:
        assert im.format == "PNG" and im.mode == "RGBA" and im.size == (100, 100)
    assert (h.path / "thumbs" / f"{clear.sha256}_100.png").exists()
    # seed 4 has alpha 4 < 255 so it is transparent too; a fully opaque RGBA image gets a JPEG
    buf = io.BytesIO()
    Image.new("RGBA", (40, 40), (1, 2, 3, 255)).save(buf, "PNG")
    solid = h.add(BinaryResult(buf.getvalue()), prompt="solid")
    assert solid.thumbnail(32)[:3] == b"\xff\xd8\xff"
    assert opaque_rgba.thumbnail(32)[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        solid.thumbnail(0)


def test_repr_mimebundle(h: History) -> None:
    e = h.add(make_image(1), prompt="a <b>bold</b> prompt " + "x" * 100)
    bundle, metadata = e._repr_mimebundle_()
    assert metadata == {"nbimagine": {"history_id": 1, "sha256": e.sha256,
                                      "file": f".nbimagine/images/{e.sha256[:2]}/{e.sha256}.png"}}
    plain = bundle["text/plain"]
    assert plain.startswith("#1 · openai/gpt-image-1 · 32x24 · a <b>bold</b> prompt") and plain.endswith("…")
    assert "data:image/jpeg;base64," in bundle["text/html"]
    assert "&lt;b&gt;bold" in bundle["text/html"] and "<b>bold" not in bundle["text/html"]
    assert repr(e).startswith("HistoryEntry('#1")


def test_export(h: History, tmp_path: Path) -> None:
    a = h.add(make_image(1), prompt="Ünïcode Axolotl, in a *teacup*!")
    b = h.add(make_image(2, "JPEG"), prompt="???", parents=[a.id], params={"n": 1})
    files = h.export(tmp_path / "out")
    assert [p.name for p in files] == ["1-unicode-axolotl-in-a-teacup.png", "2-image.jpg", "history.json"]
    assert files[0].read_bytes() == a.path.read_bytes() and files[1].read_bytes() == b.path.read_bytes()
    manifest = json.loads(files[2].read_text())
    assert manifest["notebook"] == "demo"
    assert [m["file"] for m in manifest["entries"]] == [files[0].name, files[1].name]
    assert manifest["entries"][1]["parents"] == [1] and manifest["entries"][1]["params"] == {"n": 1}


def test_history_cache_and_notebook_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = notebook_name()
    assert re.fullmatch(r"untitled-[0-9a-f]{8}|pytest", unknown)  # no notebook to go by
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/work/My Analysis.v2.ipynb")
    assert notebook_name() == "My Analysis.v2"
    set_notebook("chosen")
    assert notebook_name() == "chosen"  # an explicit name wins
    set_notebook(None)
    assert notebook_name() == "My Analysis.v2"
    monkeypatch.setenv("JPY_SESSION_NAME", "C:\\Users\\me\\draft.ipynb")
    assert notebook_name() == "draft"
    monkeypatch.delenv("JPY_SESSION_NAME")

    monkeypatch.chdir(tmp_path)
    h1 = history()
    assert h1 is history() and h1.path == tmp_path / ".nbimagine" and h1.notebook == unknown
    assert history("other") is not h1 and history("other")._store is h1._store  # one store per folder
    set_notebook("../../evil/name:*")
    assert history().notebook == "name:*" and history().path == tmp_path / ".nbimagine"
    set_notebook("/x/notebooks/report.v2.ipynb")
    assert notebook_name() == "report.v2"
    set_notebook("report.v2")
    assert notebook_name() == "report.v2"
    import nbimagine

    assert nbimagine.history is history


def test_history_after_the_shared_one_was_closed(tmp_path: Path) -> None:
    # `with history() as h:` closes the instance the magics and the studio share.
    with history("nb", root=tmp_path) as h:
        h.add(make_image(1), prompt="x")
    assert len(history("nb", root=tmp_path)) == 1


def test_vscode_notebook_name(tmp_path: Path) -> None:
    # A real IPython shell in a subprocess, so that this test process keeps no IPython state.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from nbimagine._history import notebook_name
        assert notebook_name().startswith("untitled-")
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.user_ns["__vsc_ipynb_file__"] = "/work/proj/vs code nb.ipynb"
        print(notebook_name())
    """)
    env = {k: v for k, v in os.environ.items() if k != "JPY_SESSION_NAME"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "vs code nb"


def test_import_is_light() -> None:
    code = (f"import sys; sys.path.insert(0, {SRC!r}); import nbimagine._history; "
            "print(sorted(m for m in ('PIL', 'IPython', 'openai', 'google.genai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "[]"


def test_schema_version_and_pragmas(h: History) -> None:
    conn = sqlite3.connect(h.path / "index.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == _history.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version={_history.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    newer = _history.SCHEMA_VERSION + 1
    with pytest.raises(HistoryError, match=rf"written by a newer nbimagine.*schema version {newer}"):
        History(h.path.parent, "demo")


# ---------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import io, os, sys, time
    sys.path.insert(0, {src!r})
    from PIL import Image
    from nbimagine._history import History
    from nbimagine.events import BinaryResult

    root, tag, count, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    h = History(root, "shared")
    prev = None
    print("ready", flush=True)
    while go != "-" and not os.path.exists(go):
        time.sleep(0.005)
    i = 0
    while count < 0 or i < count:
        im = Image.new("RGB", (16 + i % 7, 16), (tag * 40 % 256, i % 256, (i >> 8) % 256))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        e = h.add(BinaryResult(buf.getvalue(), {{"provider": "emulator"}}), prompt=f"w{{tag}} #{{i}}",
                  parents=[prev] if prev else [], params={{"i": i}})
        prev = e.id
        i += 1
    print("done", flush=True)
""")


def _writer(tmp_path: Path, tag: int, count: int, go: str) -> subprocess.Popen[str]:
    script = tmp_path / "writer.py"
    if not script.exists():
        script.write_text(WRITER.format(src=SRC))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "nb"), str(tag), str(count), go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_consistent(root: Path) -> History:
    h = History(root, "shared")
    conn = sqlite3.connect(h.path / "index.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()
    for e in h:
        assert e.path.exists(), e
        assert hashlib.sha256(e.path.read_bytes()).hexdigest() == e.sha256
        assert e.size_bytes == e.path.stat().st_size
    return h


def test_two_concurrent_writers(tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [_writer(tmp_path, tag, 200, str(go)) for tag in (1, 2)]
    try:
        for p in procs:  # both have opened the history before either starts writing
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read()  # type: ignore[union-attr]
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    finally:  # a failed assertion must not leave a writer waiting for "go" forever
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    h = _check_consistent(tmp_path / "nb")
    entries = list(h)
    assert len(h) == 400 == len({e.id for e in entries})
    by_writer = {1: [], 2: []}
    for e in entries:
        by_writer[int(e.prompt[1])].append(e)
    assert len(by_writer[1]) == len(by_writer[2]) == 200
    # each writer's chain of parents is intact, however the two interleaved
    for chain in by_writer.values():
        assert [e.parents for e in chain[1:]] == [(prev.id,) for prev in chain[:-1]]
    h.close()


def test_crash_mid_write_leaves_a_consistent_history(tmp_path: Path) -> None:
    rng = random.Random(1234)
    for _round in range(4):
        p = _writer(tmp_path, _round, -1, "-")  # writes until killed
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert p.returncode == -signal.SIGKILL
        h = _check_consistent(tmp_path / "nb")
        before = len(h)
        e = h.add(make_image(1000 + _round), prompt="after the crash", parents=[h[-1].id] if before else [])
        # The add that was in flight when the writer died (record written, row not committed) is
        # adopted by the next add, under the id it was given: at most one more row than before.
        assert len(h) in (before + 1, before + 2) and h.get(e.id).path.exists()
        before = len(h) - 1
        print(f"round {_round}: {before} rows before the kill, leftovers {list(h.path.rglob('*.tmp'))}")
        h.close()
    assert before > 0  # the writer did get some work done
    h = History(tmp_path / "nb", "shared")
    removed = h.cleanup()
    assert set(removed) == {"temp_files", "orphan_images", "orphan_thumbnails"}
    assert not list(h.path.rglob("*.tmp"))
    _check_consistent(tmp_path / "nb").close()
    h.close()


def test_threads_share_one_history(h: History) -> None:
    import threading

    errors: list[BaseException] = []

    def work(tag: int) -> None:
        try:
            for i in range(25):
                h.add(make_image(tag * 100 + i), prompt=f"t{tag}")
                h.latest(5)
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(h) == 100 and len({e.id for e in h}) == 100


def test_cleanup_never_removes_the_file_of_an_add_in_progress(tmp_path: Path) -> None:
    import threading

    a, b = History(tmp_path, "shared"), History(tmp_path, "shared")  # two kernels
    image = make_image(7)
    sha = hashlib.sha256(image.data).hexdigest()
    added: list[HistoryEntry] = []
    with b.batch():  # kernel B holds the write lock...
        writer = threading.Thread(target=lambda: added.append(a.add(image, prompt="racing")))
        writer.start()  # ...while kernel A adds an image...
        deadline = time.time() + 2
        while not list(a.path.rglob(f"{sha}.*")) and time.time() < deadline:
            time.sleep(0.01)
        b.cleanup()  # ...and B cleans up
    writer.join(30)
    [entry] = added
    assert entry.path.exists() and a.get(entry.id).image.data == image.data
    a.close()
    b.close()


def test_batch_is_one_transaction(h: History) -> None:
    with h.batch():
        for i in range(5):
            h.add(make_image(i), prompt=f"b{i}")
    assert len(h) == 5
    with pytest.raises(RuntimeError), h.batch():
        h.add(make_image(50), prompt="rolled back")
        raise RuntimeError("boom")
    assert len(h) == 5 and h.search("rolled back") == []
    assert h.add(make_image(51), prompt="after").id == 6  # the rolled-back id was never visible


def test_many_kernels_opening_a_new_history_at_once(tmp_path: Path) -> None:
    # SQLite answers the switch to WAL with "database is locked" without waiting when another
    # connection is creating the same file; before the retry this failed about 1 open in 12.
    code = ("import sys, time; from nbimagine._history import History; "
            "time.sleep(max(0, float(sys.argv[2]) - time.time())); print(len(History(sys.argv[1], 'shared')))")
    for round_ in range(8):
        root = tmp_path / f"round{round_}"
        start = time.time() + 0.5
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0 and out.strip() == "0", err


def test_unknown_notebooks_never_share_a_history_and_the_cell_says_which_it_uses(tmp_path: Path) -> None:
    # Two kernels that cannot tell their notebook (nbmake, a bare kernel): each gets a history of its own,
    # and the first cell that uses it names it and says how to choose another.
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{SRC!r}, {str(Path(__file__).parent)!r}]
        from histories import make_image
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "nbimagine")
        ip.run_line_magic("imagine", "history")
        ip.run_line_magic("imagine", "history")
        import nbimagine
        h = nbimagine.history()
        h.add(make_image(int(sys.argv[1])), prompt="mine")
        print("NAME", h.notebook, len(h))
    """)
    env = {k: v for k, v in os.environ.items() if k != "JPY_SESSION_NAME"}
    outs = [subprocess.run([sys.executable, "-c", code, str(i)], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path, env=env) for i in (1, 2)]
    names = []
    for out in outs:
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("nbimagine cannot tell which notebook this is") == 1  # once per kernel
        assert "%imagine history --notebook NAME" in out.stdout
        [line] = [line for line in out.stdout.splitlines() if line.startswith("NAME")]
        _, name, count = line.split()
        assert re.fullmatch(r"untitled-[0-9a-f]{8}", name) and count == "1"
        names.append(name)
    assert names[0] != names[1]
    with History(tmp_path, all_notebooks=True) as everything:
        assert everything.notebooks() == {names[0]: 1, names[1]: 1}


def test_history_root_names_another_folder(ip, tmp_path: Path) -> None:
    # E.g. when the notebook's own folder is read-only: %imagine history --root DIR keeps the history there.
    elsewhere = tmp_path / "elsewhere"
    gallery = ip.run_line_magic("imagine", f"history --root {elsewhere} --notebook nb")
    assert gallery.total == 0 and history().path == elsewhere / ".nbimagine"
    history().add(make_image(1), prompt="kept elsewhere")
    assert not (tmp_path / ".nbimagine" / "index.sqlite").exists()
    assert [e.prompt for e in History(elsewhere, "nb")] == ["kept elsewhere"]
    with pytest.raises(UsageError, match="--root DIR: give a folder"):
        ip.run_line_magic("imagine", "history --root")


def test_merge_moves_another_notebooks_images_here_and_survives_a_repair(ip, tmp_path: Path, capsys) -> None:
    # E.g. images made while the notebook could not be told, or before a rename in the file browser.
    from nbimagine._history import repair_history

    with History(tmp_path, "untitled-1a2b3c4d") as lost, History(tmp_path, "cafe") as cafe:
        a = lost.add(make_image(1), prompt="made before the name was known")
        b = cafe.add(make_image(2), prompt="made in cafe", parents=[a.id])
    set_notebook("cafe")
    empty = ip.run_line_magic("imagine", "history")
    assert "'untitled-1a2b3c4d' (1)" not in empty.note  # cafe has images: no hint needed
    gallery = ip.run_line_magic("imagine", "history --merge untitled-1a2b3c4d")
    assert "Moved 1 image(s) of 'untitled-1a2b3c4d' into the history of 'cafe'" in capsys.readouterr().out
    assert [e.id for e in gallery.entries] == [b.id, a.id]
    with pytest.raises(UsageError, match="no notebook 'nope'"):
        ip.run_line_magic("imagine", "history --merge nope")
    repair_history(tmp_path)
    with History(tmp_path, "cafe") as cafe, History(tmp_path, all_notebooks=True) as everything:
        assert [e.id for e in cafe] == [a.id, b.id] and everything.notebooks() == {"cafe": 2}


def test_an_entry_pickles_without_its_store_and_still_reads_safely(tmp_path: Path) -> None:
    # multiprocessing, joblib, a kernel's %store: an entry must travel; its store (a connection, open
    # folders, a lock) does not, and the unpickled entry reads with the same checks.
    import copy
    import pickle

    with History(tmp_path, "nb") as h:
        entry = h.add(make_image(1), prompt="travels", params={"size": "32x24"}, parents=[])
        child = h.add(make_image(2), prompt="child", parents=[entry])
    again = pickle.loads(pickle.dumps(child))
    assert again == child and again._store is None and dict(again.params) == {}
    assert again.image.data == child.image.data == make_image(2).data and again.thumbnail(16)
    assert copy.deepcopy(entry).image.data == make_image(1).data
    # The same boundary as the store: a link in place of images/<shard> is not followed.
    shard = again.path.parent
    for item in shard.iterdir():
        item.unlink()
    shard.rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / again.path.name).write_bytes(make_image(2).data)
    shard.symlink_to(outside)
    with pytest.raises(HistoryError, match=r"Refusing to read the image file of #2.*symlink"):
        again.image  # noqa: B018
    shard.unlink()
    with pytest.raises(HistoryError, match="The image file of #2 is missing"):
        again.image  # noqa: B018


@pytest.mark.parametrize("how", ["show", "show --full", "edit"])
def test_an_image_of_another_notebook_says_so(ip, tmp_path: Path, capsys, how: str) -> None:
    # Ids are unique in the folder, so #N from another notebook is allowed; the cell must not let it
    # pass for this notebook's image.
    with History(tmp_path, "cafe") as cafe, History(tmp_path, "garden") as garden:
        mine = garden.add(make_image(1), prompt="a rose")
        theirs = cafe.add(make_image(2), prompt="a cat")
    set_notebook("garden")
    if how.startswith("show"):
        shown = ip.run_line_magic("imagine", f"{how} #{theirs.id}")
        assert "from notebook 'cafe', not this one ('garden')" in repr(shown)
        data, _ = shown._repr_mimebundle_()
        assert "from notebook 'cafe', not this one ('garden')" in str(data)
        assert "not this one" not in repr(ip.run_line_magic("imagine", f"show #{mine.id}"))
        assert "not of this one" not in capsys.readouterr().out  # said once, in the caption
    else:
        ip.run_cell_magic("imagine", f"-e #{theirs.id}", "make it blue")
        out = capsys.readouterr().out
        assert f"#{theirs.id} is an image of notebook 'cafe', not of this one ('garden')." in out
        ip.run_cell_magic("imagine", f"-e #{mine.id}", "make it red")
        assert "not of this one" not in capsys.readouterr().out


@pytest.mark.parametrize("case", ["new-image", "same-image-again", "new-folders"])
def test_an_add_returns_only_once_its_files_and_their_names_are_durable(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         case: str) -> None:
    # POSIX: a file's bytes are durable after fsync(file), its name after fsync(folder). Both the image
    # and its record (the source of a repair) must be, before the row commits and add() returns.
    import stat as stat_

    with History(tmp_path, "nb") as h:
        h.add(make_image(1), prompt="first")
        base = tmp_path / ".nbimagine"
        if case == "new-folders":  # the image's shard and the record's bucket are made by this add
            monkeypatch.setattr(_history, "_BUCKET", 2)
        synced: list[tuple[str, int]] = []
        real = os.fsync

        def spy(fd: int) -> None:
            st = os.fstat(fd)
            synced.append(("dir" if stat_.S_ISDIR(st.st_mode) else "file", st.st_ino))
            real(fd)

        monkeypatch.setattr(os, "fsync", spy)
        e = h.add(make_image(1 if case == "same-image-again" else 2), prompt="second")
        monkeypatch.setattr(os, "fsync", real)
    record = base / "records" / _history._bucket(e.id) / f"{e.id}.json"
    must = {("file", record.stat().st_ino), ("dir", record.parent.stat().st_ino)}
    if case != "same-image-again":
        must |= {("file", e.path.stat().st_ino), ("dir", e.path.parent.stat().st_ino)}
    if case == "new-folders":  # a new folder's name is made durable in its parent too
        must |= {("dir", (base / "records").stat().st_ino)}
    assert must <= set(synced), (must - set(synced))
