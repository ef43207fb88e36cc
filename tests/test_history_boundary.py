"""The history's file-system boundary, attacked on purpose (real files, real links, real SQLite).

Each case is one kind: a link planted somewhere below ``.nbimagine`` (a folder, a file, the index),
an untrusted string that tries to become a path, a row or record that names something else than an
image, or a target that already exists. Whatever happens, nothing outside the history (or the
folder given to a save or an export) is read, written or deleted, and every failure is typed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import unicodedata
from pathlib import Path

import pytest
from histories import make_image, snapshot

from nbimagine._files import Folder, check_name, safe_name
from nbimagine._history import History, history, set_notebook
from nbimagine.errors import HistoryError
from nbimagine.events import BinaryResult

pytestmark = pytest.mark.usefixtures("fresh_history")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with files worth protecting, and a secret file beside it."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("# my project\n")
    (root / "analysis.ipynb").write_text("{}")
    (root / "src" / "code.py").write_text("print('hi')\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "environ").write_bytes(b"OPENAI_API_KEY=sk-secret-123456\n")
    return root


def _seeded(root: Path) -> tuple[History, list]:
    h = History(root, "nb")
    entries = [h.add(make_image(i), prompt=f"image {i}") for i in range(3)]
    entries[0].thumbnail(192)
    return h, entries


# ---------------------------------------------------------------------------------------------
# Links planted below .nbimagine
# ---------------------------------------------------------------------------------------------


def _plant(root: Path, where: str, entries: list) -> Path:
    """Replace ``where`` (below .nbimagine) by a link to somewhere outside; returns the link."""
    base = root / ".nbimagine"
    sha = entries[0].sha256
    targets = {
        "images": (base / "images", root.parent.parent),  # the case: images -> ../..
        "images-to-project": (base / "images", root),
        "shard": (base / "images" / sha[:2], root.parent / "outside"),
        "image-file": (base / "images" / sha[:2] / f"{sha}.png", root.parent / "outside" / "environ"),
        "thumbs": (base / "thumbs", root),
        "thumb-file": (base / "thumbs" / f"{sha}_192.jpg", root.parent / "outside" / "environ"),
        "records": (base / "records", root),
        "record-bucket": (base / "records" / "0000", root),
        "record-file": (base / "records" / "0000" / "1.json", root.parent / "outside" / "environ"),
        "notebooks": (base / "notebooks", root),
    }
    link, target = targets[where]
    if link.is_dir() and not link.is_symlink():
        import shutil

        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    return link


PLACEMENTS = ["images", "images-to-project", "shard", "image-file", "thumbs", "thumb-file", "records",
              "record-bucket", "record-file", "notebooks"]


@pytest.mark.parametrize("where", PLACEMENTS)
def test_a_planted_link_is_never_followed(project: Path, where: str) -> None:
    h, entries = _seeded(project)
    h.close()
    link = _plant(project, where, entries)
    outside_before = snapshot(project.parent / "outside")
    project_before = {k: v for k, v in snapshot(project).items() if not k.startswith(".nbimagine")}

    h = History(project, "nb")
    outcomes = {}
    for name, action in {
        "read": lambda: h.get(1).image,
        "thumbnail": lambda: h.get(1).thumbnail(192),
        "list": lambda: h.latest(10),
        "add-new": lambda: h.add(make_image(50), prompt="new"),
        "add-same-bytes": lambda: h.add(make_image(0), prompt="same bytes as #1"),
        "cleanup": h.cleanup,
    }.items():
        try:
            result = action()
            outcomes[name] = "ok"
            if name == "read":  # whatever was read is the recorded image, never the secret
                assert hashlib.sha256(result.data).hexdigest() == entries[0].sha256
            if name == "thumbnail":
                assert b"sk-secret" not in result
        except HistoryError as exc:
            outcomes[name] = "refused"
            assert "sk-secret" not in str(exc)
    h.close()

    # Nothing outside .nbimagine changed: not the secret, not the project's own files.
    assert snapshot(project.parent / "outside") == outside_before, outcomes
    assert {k: v for k, v in snapshot(project).items() if not k.startswith(".nbimagine")} == project_before
    # Reading through the link is refused (the bytes would not be the image anyway).
    if where in ("images", "images-to-project", "shard", "image-file"):
        assert outcomes["read"] == "refused"
    # A link where a file of ours goes is replaced by the real file, never written through.
    if where in ("image-file", "thumb-file"):
        assert not link.is_symlink()


# Links in the places a batch job, a repair or a migration use.
MORE_PLACEMENTS = {
    "jobs": lambda b: b / "jobs", "job-file": lambda b: b / "jobs" / "0123456789ab.json",
    "job-lines": lambda b: b / "jobs" / "0123456789ab.lines.json", "broken": lambda b: b / ".broken",
    "repair-lock": lambda b: b / ".repair.lock", "notebook-file": lambda b: next((b / "notebooks").iterdir()),
    "v1": lambda b: b / ".v1", "rebuild-leftover": lambda b: b / "index.sqlite.rebuild-0123abcd",
}


@pytest.mark.parametrize("where", list(MORE_PLACEMENTS))
def test_a_link_planted_for_jobs_repair_or_migration_is_never_followed(project: Path, where: str) -> None:
    h, _ = _seeded(project)
    h.add_job("0123456789ab", provider="openai", kind="openai", model="gpt-4.1", params={}, parents=[],
              connection={}, lines=[("line-1", "a prompt")])
    h.close()
    link = MORE_PLACEMENTS[where](project / ".nbimagine")
    if link.is_dir() and not link.is_symlink():
        import shutil

        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    link.symlink_to(project.parent / "outside" / ("environ" if "file" in where or "lines" in where
                                                   or where in ("repair-lock", "rebuild-leftover") else ""))
    outside_before = snapshot(project.parent / "outside")
    project_before = {k: v for k, v in snapshot(project).items() if not k.startswith(".nbimagine")}
    h = History(project, "nb")
    for action in (lambda: h.add(make_image(50), prompt="new"), lambda: h.update_job("0123456789ab", state="done"),
                   h.cleanup, h.repair, h.jobs):
        try:
            action()
        except HistoryError as exc:  # refused, typed, and never a secret in the message
            assert "sk-secret" not in str(exc)
    # Nothing was lost: the images and the job are all there (after a repair, from the old index if need be).
    assert [e.prompt for e in h] == ["image 0", "image 1", "image 2", "new"]
    assert [j.id for j in h.jobs()] == ["0123456789ab"]
    h.close()
    assert snapshot(project.parent / "outside") == outside_before
    assert {k: v for k, v in snapshot(project).items() if not k.startswith(".nbimagine")} == project_before


def test_cleanup_with_images_linked_to_the_project_deletes_nothing(project: Path) -> None:
    # The case: images/ -> ../.. made cleanup() delete the README, the notebook and the sources.
    h, entries = _seeded(project)
    (project / ".nbimagine" / "images" / "ab").mkdir(exist_ok=True)
    h.close()
    _plant(project, "images", entries)
    before = snapshot(project)
    with History(project, "nb") as again:
        removed = again.cleanup()
    assert removed["orphan_images"] == 0
    after = snapshot(project)
    assert {k: v for k, v in after.items() if not k.startswith(".nbimagine")} == \
        {k: v for k, v in before.items() if not k.startswith(".nbimagine")}


@pytest.mark.parametrize("name", ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"])
def test_a_linked_index_is_refused(project: Path, name: str) -> None:
    h, _ = _seeded(project)
    h.close()
    victim = project.parent / "outside" / "victim.sqlite"
    sqlite3.connect(victim).close()
    index = project / ".nbimagine" / name
    if index.exists():
        index.unlink()
    index.symlink_to(victim)
    before = victim.read_bytes()
    with pytest.raises(HistoryError, match=f"Refusing to open the history index.*{name}.*symlink"):
        History(project, "nb")
    assert victim.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Rows and records that do not name an image
# ---------------------------------------------------------------------------------------------

BAD_ROWS = [
    ("../../../../../../proc/self/environ", "png"),
    ("0" * 63, "png"),
    ("A" * 64, "png"),
    ("0" * 62 + "/.", "png"),
    ("0" * 64, "png/../../../../proc/self/environ"),
    ("0" * 64, ""),
    ("0" * 64, "exe"),
    ("0" * 64, "PNG"),
    ("0" * 64, "png\x00"),
]


@pytest.mark.parametrize(("sha", "ext"), BAD_ROWS)
def test_a_row_that_does_not_name_an_image_is_refused(project: Path, sha: str, ext: str) -> None:
    h, entries = _seeded(project)
    conn = sqlite3.connect(h.path / "index.sqlite")
    conn.execute("PRAGMA ignore_check_constraints = ON")  # a hostile writer ignores our CHECKs
    conn.execute("UPDATE entries SET sha256 = ?, ext = ? WHERE id = 1", (sha, ext))
    conn.commit()
    conn.close()
    with pytest.raises(HistoryError, match=r"History row #1 is malformed and was refused.*--repair"):
        h.get(1)
    with pytest.raises(HistoryError, match="malformed"):
        h[0]
    # A listing leaves the bad row out and says so: one bad row does not hide every other image.
    with pytest.warns(RuntimeWarning, match=r"row\(s\) #1 .* malformed and were left out.*--repair"):
        assert [e.id for e in h.latest(10)] == [3, 2]
    assert h.get(2).image.data == entries[1].image.data  # the other rows are fine
    h.close()


# A row edited by hand, column by column: any value of the wrong shape is refused (typed), a listing
# goes on without it, a repair brings the image back from its record, and writing goes on.
HAND_EDITS = {
    "parents-path": "UPDATE entries SET parents = '[\"../../x\"]' WHERE id = 2",
    "parents-huge": "UPDATE entries SET parents = '[99999999999999999999999]' WHERE id = 2",
    "parents-not-json": "UPDATE entries SET parents = 'nope' WHERE id = 2",
    "params-a-list": "UPDATE entries SET params = '[1, 2]' WHERE id = 2",
    "metadata-nested-deep": "UPDATE entries SET metadata = '" + "[" * 100_000 + "]" * 100_000 + "' WHERE id = 2",
    "created-garbage": "UPDATE entries SET created_at = 'yesterday' WHERE id = 2",
    "width-text": "UPDATE entries SET width = 'wide' WHERE id = 2",
    "size-text": "UPDATE entries SET size_bytes = 'big' WHERE id = 2",
    "prompt-bytes": "UPDATE entries SET prompt = x'ff00fe' WHERE id = 2",
    "sha-bytes": "UPDATE entries SET sha256 = x'00' WHERE id = 2",
    "id-huge": "UPDATE entries SET id = 9223372036854775807 WHERE id = 2",
    "counter-huge": "UPDATE sqlite_sequence SET seq = 9223372036854775807 WHERE name = 'entries'",
    "counter-text": "UPDATE sqlite_sequence SET seq = 'x' WHERE name = 'entries'",
}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
def test_a_hand_edited_row_is_refused_typed_and_repaired(project: Path, edit: str) -> None:
    import warnings

    h, entries = _seeded(project)
    h.close()
    conn = sqlite3.connect(project / ".nbimagine" / "index.sqlite")
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(HAND_EDITS[edit])
    conn.commit()
    conn.close()
    h = History(project, "nb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        listed = [e.id for e in h.latest(10)]
        assert {1, 3} <= set(listed) and len(listed) <= 3
        assert [e.id for e in h.lineage(3)] == [3]
        h.export(project.parent / "exported")
        for action in (lambda: h.get(2), lambda: h.add(make_image(7), prompt="after the edit")):
            with contextlib.suppress(HistoryError, KeyError):  # typed: refused, or an id no longer there
                action()
        report = h.repair()
        assert report.refused_records == []
        assert [e.id for e in h if e.id <= 3] == [1, 2, 3]
        assert h.get(2).image.data == entries[1].image.data
        assert h.add(make_image(8), prompt="after the repair").id < 10**18
    h.close()


def test_our_own_checks_refuse_a_bad_row_at_insert(project: Path) -> None:
    h, _ = _seeded(project)
    conn = sqlite3.connect(h.path / "index.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("UPDATE entries SET sha256 = '../x' WHERE id = 1")
    conn.close()
    h.close()


def test_show_full_never_embeds_another_file(project: Path, ip, monkeypatch: pytest.MonkeyPatch) -> None:
    # The case: sha256/ext walking out of images/ made `%imagine show 1 --full` embed a secret.
    from IPython.core.error import UsageError

    h, _ = _seeded(project)
    conn = sqlite3.connect(h.path / "index.sqlite")
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute("UPDATE entries SET sha256 = '../../../outside/environ#', ext = '' WHERE id = 1")
    conn.commit()
    conn.close()
    monkeypatch.chdir(project)
    set_notebook("nb")
    with pytest.raises(UsageError, match="malformed and was refused") as info:
        ip.run_line_magic("imagine", "show 1 --full")
    assert "sk-secret" not in str(info.value)


def test_a_replaced_image_file_is_refused_by_its_hash(project: Path) -> None:
    h, entries = _seeded(project)
    entries[1].path.write_bytes(make_image(99).data)  # same name, other bytes
    with pytest.raises(HistoryError, match=r"does not hold the recorded image.*sha256 differs"):
        _ = h.get(2).image
    h.close()


# ---------------------------------------------------------------------------------------------
# Untrusted strings that try to become paths
# ---------------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../x", "../../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b", "x\x00y", "..\\..\\x",
    "C:\\Windows\\x", "\\\\server\\share\\x", "\u2215etc\u2215passwd", "\u2044x\u2044y", "\uff0e\uff0e\uff0fx",
    "\uff3cx", "\u202eevil.png", "a" * 5000, "😀" * 300, "CON", "nul.txt", " ", "", ".hidden", "x" + "\n" * 3,
    "ig_0123abcd/../../x",
]


@pytest.mark.parametrize("text", HOSTILE_NAMES)
def test_safe_name_is_one_harmless_component(text: str) -> None:
    name = safe_name(text, fallback="fallback")
    assert check_name(name) == name
    assert not name.startswith(".") and not name.endswith((".", " "))
    assert len(name.encode("utf-8")) <= 100
    assert not any(ch in name for ch in '/\\\x00:*?"<>|\u2215\u2044\uff0f\uff3c\u202e')
    assert all(unicodedata.category(ch) not in ("Cc", "Cf") for ch in name)
    assert name.split(".")[0].upper() not in ("CON", "NUL")


@pytest.mark.parametrize("call_id", HOSTILE_NAMES)
def test_save_to_a_folder_stays_in_the_folder(tmp_path: Path, call_id: str) -> None:
    folder = tmp_path / "deep" / "er" / "saved"
    folder.mkdir(parents=True)
    image = BinaryResult(make_image(3).data, {"call_id": call_id})
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("deep/er/saved")}
    path = image.save(folder)
    assert path.parent == folder and path.read_bytes() == image.data
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("deep/er/saved")} == before
    assert image.save(str(folder) + "/") == path  # the same bytes again: reused, not duplicated
    other = BinaryResult(make_image(4).data, {"call_id": call_id})
    assert other.save(folder) != path and path.read_bytes() == image.data  # never replaced


def test_save_never_writes_through_a_link_and_overwrite_is_explicit(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cat.png").symlink_to(secret)
    image = make_image(5)
    with pytest.raises(FileExistsError):
        image.save(tmp_path / "out" / "cat.png", overwrite=False)
    assert secret.read_text() == "keep me"
    path = image.save(tmp_path / "out" / "cat.png")  # overwrite=True replaces the link itself
    assert not path.is_symlink() and path.read_bytes() == image.data and secret.read_text() == "keep me"
    # A call id naming an existing link in the folder gets a free name instead.
    (tmp_path / "out" / "evil.png").symlink_to(secret)
    saved = BinaryResult(image.data, {"call_id": "evil"}).save(tmp_path / "out")
    assert saved.name == "evil-2.png" and secret.read_text() == "keep me"


def test_studio_save_stays_in_the_folder(tmp_path: Path, emu) -> None:
    from nbimagine._session import ImagineSession, set_emulator
    from nbimagine._widgets import Studio

    set_emulator(emu)
    try:
        h = History(tmp_path, "studio")
        e = h.add(BinaryResult(make_image(8).data, {"call_id": "../../../escaped"}), prompt="x")
        studio = Studio(ImagineSession(emulator=True), h, settings=False)
        studio.set_selection([e.id])
        [written] = studio.save_selected(str(tmp_path / "saved") + "/")
        # The studio names a file like %imagine export does (id and prompt): the call id never becomes a path.
        assert written.parent == (tmp_path / "saved").resolve() and written.name == f"{e.id}-x.png"
        assert not (tmp_path.parent / "escaped.png").exists()
        # Save never replaces a file silently.
        (tmp_path / "taken.png").write_bytes(b"mine")
        assert studio.save_selected(str(tmp_path / "taken.png")) == []
        assert (tmp_path / "taken.png").read_bytes() == b"mine"
        h.close()
    finally:
        set_emulator(None)


# ---------------------------------------------------------------------------------------------
# Export: never overwrites silently, never writes through a link
# ---------------------------------------------------------------------------------------------


def test_export_never_overwrites_silently(project: Path) -> None:
    h, entries = _seeded(project)
    out = project.parent / "export"
    out.mkdir()
    (out / "history.json").write_text('{"mine": true}')
    (out / "1-image-0.png").write_bytes(b"my own file")
    written = h.export(out)
    names = [p.name for p in written]
    assert names == ["1-image-0-2.png", "2-image-1.png", "3-image-2.png", "history-2.json"]
    assert (out / "history.json").read_text() == '{"mine": true}'
    assert (out / "1-image-0.png").read_bytes() == b"my own file"
    manifest = json.loads((out / "history-2.json").read_text())
    assert [m["file"] for m in manifest["entries"]] == names[:3]
    # Again: identical image files are reused, the manifest gets a new name.
    again = [p.name for p in h.export(out)]
    assert again[:3] == names[:3] and again[3] == "history-3.json"
    # Explicit overwrite replaces.
    forced = [p.name for p in h.export(out, overwrite=True)]
    assert forced == ["1-image-0.png", "2-image-1.png", "3-image-2.png", "history.json"]
    assert (out / "1-image-0.png").read_bytes() == entries[0].image.data
    h.close()


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_writes_through_a_link(project: Path, overwrite: bool) -> None:
    h, _ = _seeded(project)
    out = project.parent / "export"
    out.mkdir()
    secret = project.parent / "outside" / "environ"
    before = secret.read_bytes()
    (out / "history.json").symlink_to(secret)
    (out / "2-image-1.png").symlink_to(secret)
    h.export(out, overwrite=overwrite)
    assert secret.read_bytes() == before
    if overwrite:
        assert not (out / "history.json").is_symlink() and json.loads((out / "history.json").read_text())
    else:
        assert (out / "history.json").is_symlink() and (out / "history-2.json").is_file()
    h.close()


def test_export_magic_needs_force_to_replace(project: Path, ip, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    h, _ = _seeded(project)
    h.close()
    monkeypatch.chdir(project)
    set_notebook("nb")
    shell = ip
    out = project.parent / "export"
    shell.run_line_magic("imagine", f"export {out}")
    shell.run_line_magic("imagine", f"export {out}")
    assert sorted(p.name for p in out.glob("history*.json")) == ["history-2.json", "history.json"]
    shell.run_line_magic("imagine", f"export {out} --force")
    assert sorted(p.name for p in out.glob("history*.json")) == ["history-2.json", "history.json"]
    assert "Exported 3 image(s) and history.json" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Notebook names of any length and alphabet
# ---------------------------------------------------------------------------------------------

NAMES = ["カフェの猫" * 24, "a/b", "a_b", "a\\b", "..", "CON", "x" * 10_000, "nb\x00null", "\u202eevil",
         "Straße", "Strasse", "Ｃａｆé", "café", "cafe\u0301"]


def test_names_of_any_length_and_alphabet_are_distinct_histories(tmp_path: Path) -> None:
    images = {}
    for i, name in enumerate(NAMES):
        with History(tmp_path, name) as h:
            images[name] = h.add(make_image(i), prompt=f"in {name[:20]!r}")
    # NFC: "café" typed two ways is one notebook; control and format characters shown as "_";
    # everything else is its own notebook.
    expected = {unicodedata.normalize("NFC", n).replace("\x00", "_").replace("\u202e", "_") for n in NAMES}
    with History(tmp_path, all_notebooks=True) as everything:
        assert set(everything.notebooks()) == expected
    for name in NAMES:
        with History(tmp_path, name) as h:
            mine = [e.sha256 for e in h]
            assert images[name].sha256 in mine
            assert len(mine) == (2 if name in ("café", "cafe\u0301") else 1), name
    assert not [p for p in (tmp_path / ".nbimagine").iterdir() if p.name not in
                ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "images", "records", "notebooks")]


def test_a_bad_name_never_sticks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The case: a 120-character CJK name failed with "File name too long" in every later cell.
    monkeypatch.chdir(tmp_path)
    set_notebook("/home/me/" + "長い名前のノートブック" * 11 + ".ipynb")
    first = history().add(make_image(1), prompt="one")
    assert first.notebook == "長い名前のノートブック" * 11
    with pytest.raises(ValueError):
        set_notebook("/")  # names nothing: refused, the previous name stays
    assert history().add(make_image(2), prompt="two").notebook == first.notebook
    set_notebook("short")
    assert history().add(make_image(3), prompt="three").notebook == "short"


def test_folder_helper_refuses_paths_as_names(tmp_path: Path) -> None:
    with Folder.open(tmp_path / "f") as folder:
        for bad in ("../x", "a/b", "", ".", "..", "x\x00"):
            with pytest.raises(ValueError):
                folder.write(bad, b"x")
        assert folder.write("ok.bin", b"x") == "ok.bin"
        with pytest.raises(FileExistsError):
            folder.write("ok.bin", b"y")
        assert (tmp_path / "f" / "ok.bin").read_bytes() == b"x"
        os.symlink(tmp_path, tmp_path / "f" / "up")
        with pytest.raises(OSError):
            folder.child("up")
        assert not folder.unlink_file("up") and (tmp_path / "f" / "up").is_symlink()
        assert hashlib.sha256(folder.read("ok.bin")).hexdigest() == hashlib.sha256(b"x").hexdigest()


def _export_targets(tmp: Path) -> dict[str, str | Path]:
    (tmp / "a-file").write_text("x")
    for name, blocker in (("json-is-a-folder", "history.json"), ("image-is-a-folder", "1-image-0.png")):
        (tmp / name / blocker).mkdir(parents=True)
    return {"a file": tmp / "a-file", "under a file": tmp / "a-file" / "sub", "a NUL": str(tmp / "a\x00b"),
            "name too long": tmp / ("x" * 300), "json-is-a-folder": tmp / "json-is-a-folder",
            "image-is-a-folder": tmp / "image-is-a-folder"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_export_target_in_the_way_is_a_typed_error_about_the_target(project: Path, overwrite: bool) -> None:
    h, _ = _seeded(project)
    for what, target in _export_targets(project.parent).items():
        try:
            h.export(target, overwrite=overwrite)
        except HistoryError as exc:  # the history is fine: the fix is about the target, never a repair
            assert "Export to another folder" in str(exc) and "--repair" not in str(exc), what
        else:  # without overwrite, what is in the way is kept and a free name is used
            assert not overwrite and what in ("json-is-a-folder", "image-is-a-folder"), what
    h.close()
