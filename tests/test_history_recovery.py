"""A history that is lost, damaged, foreign, read-only, locked or full; kill -9; repair; migration.

Every failure is a ``HistoryError`` that names the file, keeps the real cause on ``__cause__`` and
says what to do; nothing that was reported saved is ever lost. Real processes, real file systems
(read-only and full ones are made with a private mount namespace, ``unshare``), real SQLite.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from histories import legacy_notebook, make_image

from nbimagine import _history
from nbimagine._history import SCHEMA_VERSION, History, repair_history, set_notebook
from nbimagine.errors import HistoryError

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


pytestmark = pytest.mark.usefixtures("fresh_history")


def _seed(root: Path, notebook: str = "nb", count: int = 4) -> list:
    with History(root, notebook) as h:
        entries = []
        for i in range(count):
            entries.append(h.add(make_image(i), prompt=f"{notebook} image {i}", params={"i": i},
                                 parents=[entries[-1].id] if entries else []))
        return entries


def _same(entry, again) -> None:
    assert (again.id, again.prompt, dict(again.params), again.parents, again.sha256, again.notebook) == \
        (entry.id, entry.prompt, dict(entry.params), entry.parents, entry.sha256, entry.notebook)


# ---------------------------------------------------------------------------------------------
# Damaged indexes: typed errors, then repair
# ---------------------------------------------------------------------------------------------


def _damage(index: Path, how: str) -> None:
    for extra in ("-wal", "-shm"):
        Path(f"{index}{extra}").unlink(missing_ok=True)
    if how == "deleted":
        index.unlink()
    elif how == "zero-bytes":
        index.write_bytes(b"")
    elif how == "truncated":
        index.write_bytes(index.read_bytes()[:1500])
    elif how == "garbage":
        data = bytearray(index.read_bytes())
        data[:100] = os.urandom(100)
        index.write_bytes(bytes(data))
    elif how == "foreign":
        index.unlink()
        conn = sqlite3.connect(index)
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()
        conn.close()
    elif how == "no-such-column":  # ours, but a column gone (a hand edit, a bad tool)
        conn = sqlite3.connect(index)
        conn.execute("DROP TABLE edges")
        conn.execute("CREATE TABLE edges (child INTEGER)")
        conn.commit()
        conn.close()


DAMAGE = {
    "deleted": "The history index is missing but image records exist",
    "zero-bytes": r"The history index is empty \(0 bytes\) but image records exist",
    "truncated": "Cannot open the history index.*damaged",
    "garbage": "Cannot open the history index.*damaged",
    "foreign": "This is not an nbimagine history index.*customers",
    "no-such-column": "The history index is damaged.*table 'edges' lacks parent",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_index_is_a_typed_error_then_repair_restores_everything(tmp_path: Path, how: str) -> None:
    entries = _seed(tmp_path, "nb") + _seed(tmp_path, "other", 2)
    index = tmp_path / ".nbimagine" / "index.sqlite"
    _damage(index, how)
    with pytest.raises(HistoryError, match=DAMAGE[how]) as info:
        History(tmp_path, "nb")
    text = str(info.value)
    assert str(index) in text and "--repair" in text
    assert "Traceback" not in text and "cannot rollback" not in text
    if how in ("truncated", "garbage"):
        assert isinstance(info.value.__cause__, sqlite3.DatabaseError)  # the real cause is kept

    report = repair_history(tmp_path)
    assert report.entries == len(entries) == report.from_records and report.notebooks == 2
    if how not in ("deleted",):
        assert report.old_index is not None and report.old_index.parent.name == ".broken"
    with History(tmp_path, "nb") as h, History(tmp_path, "other") as other:
        assert len(h) == 4 and len(other) == 2
        for e in entries:
            _same(e, h.get(e.id))
            assert h.get(e.id).image.data == e.image.data
        assert [x.id for x in h.lineage(entries[3].id)] == [e.id for e in entries[:4]]
        assert h.add(make_image(77), prompt="after the repair").id == max(e.id for e in entries) + 1
        assert h.cleanup() == {"temp_files": 0, "orphan_images": 0, "orphan_thumbnails": 0}


def test_the_magic_repairs_and_shows_the_history(tmp_path: Path, ip, capsys) -> None:
    from IPython.core.error import UsageError

    _seed(tmp_path, "nb", 3)
    _damage(tmp_path / ".nbimagine" / "index.sqlite", "garbage")
    set_notebook("nb")
    shell = ip
    with pytest.raises(UsageError, match=r"damaged.*%imagine history --repair"):
        shell.run_line_magic("imagine", "history")
    gallery = shell.run_line_magic("imagine", "history --repair")
    assert "Rebuilt" in capsys.readouterr().out
    assert [e.id for e in gallery.entries] == [3, 2, 1]
    with pytest.raises(UsageError, match="give the notebook's name"):
        shell.run_line_magic("imagine", "history --notebook")


def test_repair_keeps_notebook_renames_and_old_index_rows(tmp_path: Path) -> None:
    entries = _seed(tmp_path, "Untitled", 2)
    with History(tmp_path, "Untitled") as h:
        assert h._store.follow("kernel-1", "Untitled") is None
        assert h._store.follow("kernel-1", "cafe") == "Untitled"  # renamed while the kernel ran it
    # A row whose record was lost is kept from the old index (and its record written again).
    record = tmp_path / ".nbimagine" / "records" / "0000" / "2.json"
    record.unlink()
    report = repair_history(tmp_path)
    assert report.from_records == 1 and report.from_old_index == 1 and record.is_file()
    with History(tmp_path, "cafe") as cafe, History(tmp_path, "Untitled") as untitled:
        assert [e.id for e in cafe] == [e.id for e in entries] and len(untitled) == 0


def test_repair_reports_what_it_could_not_use(tmp_path: Path) -> None:
    entries = _seed(tmp_path, "nb", 3)
    records = tmp_path / ".nbimagine" / "records" / "0000"
    (records / "2.json").write_text('{"record": 1, "id": 2, "sha256": "../../etc/passwd"}')
    entries[2].path.unlink()
    report = repair_history(tmp_path)
    assert report.refused_records == ["records/0000/2.json"] and report.missing_images == [3]
    assert report.from_old_index == 1  # #2 still came from the old index, which was readable
    assert json.loads((records / "2.json").read_text())["prompt"] == "nb image 1"  # written again
    assert [p.name.split("-")[0] for p in records.glob("2.json.refused-*")] == ["2.json.refused"]
    assert "not well-formed" in str(report) and "missing (#3)" in str(report)


def test_cleanup_deletes_nothing_while_the_index_disagrees(tmp_path: Path) -> None:
    # The case: a 0-byte index opened as an empty history and cleanup() deleted 19 of 20 images.
    entries = _seed(tmp_path, "nb", 5)
    index = tmp_path / ".nbimagine" / "index.sqlite"
    _damage(index, "zero-bytes")
    with pytest.raises(HistoryError, match="empty"):
        History(tmp_path, "nb")
    repair_history(tmp_path)
    with History(tmp_path, "nb") as h:
        conn = sqlite3.connect(index)
        conn.execute("DELETE FROM edges")
        conn.execute("DELETE FROM entries WHERE id > 1")
        conn.commit()
        conn.close()
        with pytest.raises(HistoryError, match=r"cleanup\(\) refused.*records disagree"):
            h.cleanup()
        assert all(e.path.exists() for e in entries)
        conn = sqlite3.connect(index)
        conn.execute("DELETE FROM entries")
        conn.commit()
        conn.close()
        for record in (tmp_path / ".nbimagine" / "records").rglob("*.json"):
            record.unlink()
        with pytest.raises(HistoryError, match="lists no image but image files exist"):
            h.cleanup()
        assert all(e.path.exists() for e in entries)


def test_cleanup_removes_only_its_own_leftovers(tmp_path: Path) -> None:
    entries = _seed(tmp_path, "nb", 2)
    base = tmp_path / ".nbimagine"
    orphan = make_image(40)
    sha = hashlib.sha256(orphan.data).hexdigest()
    (base / "images" / sha[:2]).mkdir(exist_ok=True)
    (base / "images" / sha[:2] / f"{sha}.png").write_bytes(orphan.data)
    (base / "images" / sha[:2] / ".x.png.0123456789ab.tmp").write_bytes(b"half")
    (base / "images" / sha[:2] / "notes.txt").write_text("mine, not nbimagine's")
    (base / "thumbs").mkdir(exist_ok=True)
    (base / "thumbs" / f"{sha}_192.jpg").write_bytes(b"thumb of the orphan")
    (base / "thumbs" / f"{entries[0].sha256}_192.jpg").write_bytes(b"thumb of #1")
    with History(tmp_path, "nb") as h:
        assert h.cleanup() == {"temp_files": 1, "orphan_images": 1, "orphan_thumbnails": 1}
    assert (base / "images" / sha[:2] / "notes.txt").exists()
    assert (base / "thumbs" / f"{entries[0].sha256}_192.jpg").exists()
    assert all(e.path.exists() for e in entries)


# ---------------------------------------------------------------------------------------------
# kill -9 during a loop of adds, then repair
# ---------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{src!r}, {tests!r}]
    from histories import make_image
    from nbimagine._history import History

    root, notebook, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    h = History(root, notebook)
    prev = None
    for i in range(start, start + 100_000):
        e = h.add(make_image(i, size=(40, 30)), prompt=f"{{notebook}} #{{i}}", params={{"i": i}},
                  parents=[prev] if prev and i % 3 else [])
        prev = e.id
        print(json.dumps({{"id": e.id, "prompt": e.prompt, "sha": e.sha256, "parents": list(e.parents)}}), flush=True)
""")


def _kill_after(root: Path, notebook: str, start: int, count: int, script: Path) -> list[dict]:
    """Run a writer, kill -9 it once it has reported ``count`` saved images; what it reported.

    Every line is read from the one buffered ``proc.stdout``: ``communicate()`` would read the pipe's
    fd directly and miss the lines ``readline()`` had already buffered (on a loaded machine the writer
    runs ahead, and the reported entries looked like extra, resurrected ones).
    """
    errors = (script.parent / f"{notebook}-{start}.stderr").open("w")
    proc = subprocess.Popen([sys.executable, str(script), str(root), notebook, str(start)],
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        while len(lines) < count:
            line = proc.stdout.readline()
            assert line.endswith("\n"), Path(errors.name).read_text() or "writer ended"
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        lines += proc.stdout.read().splitlines(keepends=True)  # to EOF: the pipe closes with the process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errors.close()
    assert proc.returncode == -signal.SIGKILL
    # One write per line (shorter than PIPE_BUF), so a line is whole or absent.
    return [json.loads(line) for line in lines if line.endswith("\n")]


@pytest.mark.parametrize("damage", ["deleted", "garbage", "truncated"])
def test_kill_9_during_adds_then_repair_loses_and_duplicates_nothing(tmp_path: Path, damage: str) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(src=SRC, tests=TESTS))
    rng = random.Random(damage)
    reported: list[dict] = []
    in_flight = set()  # the prompt of the add each kill may have interrupted (saved, not yet reported)
    for round_ in range(3):
        for notebook in ("a", "b"):  # two notebooks, one store
            start = 1000 * round_ + (500 if notebook == "b" else 0)
            got = _kill_after(tmp_path, notebook, start, rng.randint(3, 25), script)
            assert [int(r["prompt"].split("#")[1]) for r in got] == list(range(start, start + len(got)))
            reported += got
            in_flight.add(f"{notebook} #{start + len(got)}")
    with History(tmp_path, all_notebooks=True) as everything:
        before = {e.id: e.prompt for e in everything}
    _damage(tmp_path / ".nbimagine" / "index.sqlite", damage)
    report = repair_history(tmp_path)
    with History(tmp_path, all_notebooks=True) as everything:
        after = list(everything)
        by_id = {e.id: e for e in after}
        for item in reported:  # nothing reported saved is lost
            e = by_id[item["id"]]
            assert (e.prompt, e.sha256, list(e.parents), e.notebook) == \
                (item["prompt"], item["sha"], item["parents"], item["prompt"].split(" ")[0])
            assert e.params == {"i": int(item["prompt"].split("#")[1])}
            assert hashlib.sha256(e.image.data).hexdigest() == item["sha"]
        prompts = [e.prompt for e in after]
        assert len(prompts) == len(set(prompts))  # nothing duplicated
        # Beyond the reported ones, only the add each kill interrupted (its record was whole): nothing
        # older comes back, nothing is made up.
        assert set(before) <= set(by_id)
        assert set(prompts) - {r["prompt"] for r in reported} <= in_flight
    assert report.refused_records == []
    with History(tmp_path, "a") as a:
        assert a.cleanup()["orphan_images"] <= len(in_flight)  # at most the image of each interrupted add


def _interrupted_add(root: Path, image: str) -> tuple[int, bytes]:
    """The files an add leaves when killed after writing its record and before committing its row:
    the record, and the image file in the state ``image``. Returns the record's id and image bytes."""
    with History(root, "nb") as h:
        last = h.add(make_image(1), prompt="committed")
    data = make_image(2).data
    sha = hashlib.sha256(data).hexdigest()
    entry_id = last.id + 1
    record = _history._record(entry_id, notebook_uid=None, notebook="nb", created_at="2026-01-01T00:00:00+00:00",
                              prompt="in flight", revised_prompt=None, provider="openai", model="m", params="{}",
                              parents=[last.id], sha256=sha, ext="png", width=32, height=24, size_bytes=len(data),
                              metadata="{}", text=None)
    (root / ".nbimagine" / "records" / "0000" / f"{entry_id}.json").write_bytes(record)
    shard = root / ".nbimagine" / "images" / sha[:2]
    shard.mkdir(exist_ok=True)
    target = shard / f"{sha}.png"
    if image == "whole":
        target.write_bytes(data)
    elif image == "empty":  # created, its bytes never reached the disk
        target.write_bytes(b"")
    elif image == "torn":
        target.write_bytes(data[: len(data) // 2])
    elif image == "other-bytes":  # the right size, not the right bytes
        target.write_bytes(bytes(len(data)))
    elif image == "symlink":  # a whole copy, but through a link
        outside = root / "copy.png"
        outside.write_bytes(data)
        target.symlink_to(outside)
    return entry_id, data


@pytest.mark.parametrize("image", ["whole", "missing", "empty", "torn", "other-bytes", "symlink"])
def test_an_interrupted_add_is_adopted_only_with_its_whole_image(tmp_path: Path, image: str) -> None:
    # The record and the image are written at the same time; a kill can leave either without the other.
    entry_id, data = _interrupted_add(tmp_path, image)
    with History(tmp_path, "nb") as h:
        after = h.add(make_image(3), prompt="next")
        assert after.id == entry_id + 1  # the interrupted add's id is never given to another image
        if image == "whole":
            adopted = h.get(entry_id)
            assert (adopted.prompt, adopted.image.data, adopted.parents) == ("in flight", data, (entry_id - 1,))
        else:
            assert entry_id not in h and [e.prompt for e in h] == ["committed", "next"]
            refused = list((tmp_path / ".nbimagine" / "records" / "0000").glob(f"{entry_id}.json.refused-*"))
            assert len(refused) == 1
    assert repair_history(tmp_path).entries == (3 if image == "whole" else 2)


# ---------------------------------------------------------------------------------------------
# Read-only, locked and full
# ---------------------------------------------------------------------------------------------

UNSHARE = shutil.which("unshare")


def _in_private_mount(tmp_path: Path, mount: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with a private mount namespace where ``mount`` (shell) was done first."""
    script = tmp_path / "inside.py"
    script.write_text(f"import sys\nsys.path[:0] = [{SRC!r}, {TESTS!r}]\n" + textwrap.dedent(code))
    command = f"{mount} && exec {sys.executable} {script}"
    return subprocess.run([UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c", command],
                          capture_output=True, text=True, timeout=120)


def _private_mounts_work(tmp_path: Path) -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def test_read_only_folder(tmp_path: Path) -> None:
    if not _private_mounts_work(tmp_path):
        pytest.skip("unshare (user and mount namespaces) is not available here")
    project = tmp_path / "project"
    project.mkdir()
    _seed(project, "nb", 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    ro = f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path}"
    result = _in_private_mount(tmp_path, ro, f"""
        from pathlib import Path
        from histories import make_image
        from nbimagine._history import History
        from nbimagine.errors import HistoryError
        h = History({str(project)!r}, "nb")
        assert h.read_only and [e.prompt for e in h] == ["nb image 0", "nb image 1"]
        assert h.get(1).image.width == 32 and h.get(2).thumbnail(32)
        try:
            h.add(make_image(9), prompt="x")
        except HistoryError as exc:
            print("ADD:", exc)
        try:
            History({str(empty)!r}, "nb")
        except HistoryError as exc:
            print("NEW:", exc)
    """)
    assert result.returncode == 0, result.stderr
    add = next(line for line in result.stdout.splitlines() if line.startswith("ADD:"))
    new = next(line for line in result.stdout.splitlines() if line.startswith("NEW:"))
    assert "index.sqlite" in add and "read-only" in add and "--no-history" in add
    assert str(empty / ".nbimagine") in new and "Read-only file system" in new and "--root DIR" in new


def test_locked_index(tmp_path: Path) -> None:
    _seed(tmp_path, "nb", 1)
    other = sqlite3.connect(tmp_path / ".nbimagine" / "index.sqlite", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
    try:
        with History(tmp_path, "nb", timeout=0.2) as h:
            assert len(h) == 1  # WAL: reading goes on
            with pytest.raises(HistoryError, match=r"write lock for more than 0.2 s.*--no-history") as info:
                h.add(make_image(5), prompt="blocked")
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        other.execute("ROLLBACK")
        other.close()
    with History(tmp_path, "nb") as h:
        assert h.add(make_image(5), prompt="now").id == 2
        assert not (tmp_path / ".nbimagine" / "records" / "0000" / "3.json").exists()


def test_full_disk(tmp_path: Path) -> None:
    # The case: a full disk while creating a history surfaced as "cannot rollback".
    if not _private_mounts_work(tmp_path):
        pytest.skip("unshare (user and mount namespaces) is not available here")
    small = tmp_path / "small"
    small.mkdir()
    mount = f"mount -t tmpfs -o size=320k tmpfs {small}"
    result = _in_private_mount(tmp_path, mount, f"""
        import os
        from histories import make_image
        from nbimagine._history import History
        from nbimagine.errors import HistoryError
        from nbimagine.events import BinaryResult
        root = {str(small)!r}
        h = History(root + "/a", "nb")
        h.add(make_image(1), prompt="fits")
        big = BinaryResult(make_image(2, size=(400, 400)).data + os.urandom(400_000))
        try:
            h.add(big, prompt="too big")
        except HistoryError as exc:
            print("ADD:", exc)
        print("AFTER:", [e.prompt for e in h])
        try:
            with open(root + "/filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError:
            pass
        try:
            History(root + "/b", "nb").add(make_image(3), prompt="no room")
        except HistoryError as exc:
            print("NEW:", exc)
    """)
    assert result.returncode == 0, result.stderr
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}
    for key in ("ADD", "NEW"):
        assert "No space left on device" in lines[key] or "disk is full" in lines[key], lines[key]
        assert "cannot rollback" not in lines[key] and "Free some disk space" in lines[key]
    assert lines["AFTER"] == "AFTER: ['fits']"


# ---------------------------------------------------------------------------------------------
# Migration of the per-notebook folders of nbimagine <= 0.1
# ---------------------------------------------------------------------------------------------


def _legacy_folder_of_four(root: Path) -> dict[str, dict[int, object]]:
    return {
        "cafe": legacy_notebook(root, "cafe", [(1, "a cat", []), (2, "a hat on the cat", [1]),
                                               (3, "a scarf too", [2])], "2025-01-02T00:00:00+00:00"),
        "Untitled": legacy_notebook(root, "Untitled", [(11, "a dog", []), (12, "the dog in the rain", [1])],
                                    "2025-01-01T00:00:00+00:00"),
        "images": legacy_notebook(root, "images", [(21, "a notebook called images", [])]),
        "index.sqlite": legacy_notebook(root, "index.sqlite", [(31, "a notebook called index.sqlite", [])]),
    }


def test_per_notebook_folders_are_migrated_without_loss(tmp_path: Path) -> None:
    made = _legacy_folder_of_four(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"new ids; their old ids still work.*") as caught:
        h = History(tmp_path, "cafe")
    message = str(caught[0].message)
    assert "5 image(s) from 4 notebook(s)" not in message and "7 image(s) from 4 notebook(s) imported" in message
    with h:
        # The largest notebook keeps its ids, so its saved captions stay exact.
        assert [(e.id, e.prompt) for e in h] == [(1, "a cat"), (2, "a hat on the cat"), (3, "a scarf too")]
        assert [e.id for e in h.lineage(3)] == [1, 2, 3]
        assert h.resolve("#1").prompt == "a cat"
        for number, image in made["cafe"].items():
            assert h.get(number).image.data == image.data
        with History(tmp_path, "Untitled") as untitled:
            dog, rain = list(untitled)
            assert dog.id > 3 and rain.id > dog.id and rain.parents == (dog.id,)
            # The old captions still resolve in their notebook: "#1" there is the dog.
            assert untitled.resolve("#1").id == dog.id and untitled.resolve("#2").id == rain.id
            assert untitled.resolve(f"#{dog.id}") == dog
            assert dog.image.data == made["Untitled"][1].data
        for name in ("images", "index.sqlite"):
            prompt = f"a notebook called {name}"
            with History(tmp_path, name) as other:
                [entry] = list(other)
                assert entry.prompt == prompt and entry.image.data == made[name][1].data
        assert h.notebooks() == {"Untitled": 2, "cafe": 3, "images": 1, "index.sqlite": 1}
    base = tmp_path / ".nbimagine"
    # The old folders are kept (their indexes) in .v1/, out of the way; the store's own folders are clean.
    assert sorted(p.name for p in (base / ".v1").iterdir()) == ["Untitled", "cafe", "images", "index.sqlite"]
    assert not (base / "images" / "index.sqlite").exists() and (base / "index.sqlite").is_file()
    assert len(list((base / "records").rglob("*.json"))) == 7
    # Opening again imports nothing twice; a repair keeps the old ids working.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        History(tmp_path, "cafe").close()
    repair_history(tmp_path)
    with History(tmp_path, "Untitled") as untitled:
        assert untitled.resolve("#1").prompt == "a dog"
    with History(tmp_path, all_notebooks=True) as everything:
        assert len(everything) == 7


def test_an_interrupted_migration_runs_again_without_duplicates(tmp_path: Path) -> None:
    _legacy_folder_of_four(tmp_path)
    with pytest.warns(RuntimeWarning):
        History(tmp_path, "cafe").close()
    base = tmp_path / ".nbimagine"
    shutil.move(base / ".v1" / "cafe", base / "cafe")  # as if the move after the commit never happened
    History(tmp_path, "cafe").close()
    with History(tmp_path, all_notebooks=True) as everything:
        assert len(everything) == 7
    assert not (base / "cafe").exists() and (base / ".v1" / "cafe").is_dir()


def test_a_legacy_folder_that_cannot_be_read_is_left_alone(tmp_path: Path) -> None:
    legacy_notebook(tmp_path, "good", [(1, "fine", [])])
    bad = tmp_path / ".nbimagine" / "bad"
    bad.mkdir()
    (bad / "index.sqlite").write_bytes(b"not a database at all" * 50)
    with pytest.warns(RuntimeWarning, match="'bad' could not be read and was left as it is"), \
            History(tmp_path, "good") as h:
        assert [e.prompt for e in h] == ["fine"]
    assert (bad / "index.sqlite").exists()


def test_schema_version_is_current_and_migrations_are_one_transaction(tmp_path: Path) -> None:
    _seed(tmp_path, "nb", 1)
    conn = sqlite3.connect(tmp_path / ".nbimagine" / "index.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == _history.APPLICATION_ID
    conn.close()
    # A migration step that fails leaves the index as it was (one transaction) and says why.
    fresh = tmp_path / "fresh"

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk I/O error")

    steps = dict(_history._MIGRATIONS)
    _history._MIGRATIONS[SCHEMA_VERSION + 1] = broken
    try:
        with pytest.raises(HistoryError, match=r"Cannot prepare the image history.*disk I/O error"):
            History(fresh, "nb")
    finally:
        _history._MIGRATIONS.clear()
        _history._MIGRATIONS.update(steps)
    conn = sqlite3.connect(fresh / ".nbimagine" / "index.sqlite")
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    conn.close()
    with History(fresh, "nb") as h:
        assert len(h) == 0


def test_a_history_folder_deleted_while_open_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Writing on into the deleted folder (still open) would lose every later image without a word.
    from nbimagine._history import history

    monkeypatch.chdir(tmp_path)
    h = history("nb")
    h.add(make_image(1), prompt="before")
    shutil.rmtree(tmp_path / ".nbimagine")
    again = history("nb")
    entry = again.add(make_image(2), prompt="after")
    assert entry.path.is_file() and (tmp_path / ".nbimagine" / "records").is_dir()
    assert [e.prompt for e in History(tmp_path, "nb")] == ["after"]


def test_a_repair_on_a_full_disk_is_typed_and_loses_nothing(tmp_path: Path) -> None:
    if not _private_mounts_work(tmp_path):
        pytest.skip("unshare (user and mount namespaces) is not available here")
    small = tmp_path / "small"
    small.mkdir()
    result = _in_private_mount(tmp_path, f"mount -t tmpfs -o size=8m tmpfs {small}", f"""
        import os
        from histories import make_image
        from nbimagine._history import History, repair_history
        from nbimagine.errors import HistoryError
        root = {str(small)!r}
        with History(root, "nb") as h, h.batch():
            for i in range(300):
                h.add(make_image(i), prompt=f"image {{i}} " + "x" * 500)
        os.unlink(root + "/.nbimagine/index.sqlite")
        for chunk in (65536, 1):
            try:
                with open(root + f"/filler-{{chunk}}", "wb") as f:
                    while True:
                        f.write(b"x" * chunk)
                        f.flush()
            except OSError:
                pass
        try:
            repair_history(root)
        except HistoryError as exc:
            print("REPAIR:", exc)
        os.unlink(root + "/filler-65536")
        print("AGAIN:", repair_history(root).entries)
    """)
    assert result.returncode == 0, result.stderr
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}
    assert "disk is full" in lines["REPAIR"] and "Free some disk space" in lines["REPAIR"], result.stdout
    assert lines["AGAIN"] == "AGAIN: 300"
