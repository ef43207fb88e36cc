"""Helpers for the history tests: small distinct images, snapshots of folders, and the on-disk layout
of nbimagine <= 0.1 (one folder per notebook), written byte for byte as that version wrote it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
from pathlib import Path

from PIL import Image

from nbimagine.events import BinaryResult


def make_image(seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (32, 24), alpha: bool = False,
               **meta: object) -> BinaryResult:
    """A small, distinct image per seed."""
    mode = "RGBA" if alpha else "RGB"
    color = (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256) + ((seed % 200,) if alpha else ())
    im = Image.new(mode, size, color)
    im.putpixel((0, 0), (seed % 256, (seed >> 8) % 256, 7) + ((255,) if alpha else ()))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return BinaryResult(buf.getvalue(), {"provider": "openai", "model": "gpt-image-1", **meta})


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (links not followed): relative path -> bytes, link target or "dir"."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes()
    return found


# The schema of nbimagine <= 0.1 (schema version 1), one index per notebook folder.
LEGACY_V1_SCHEMA = """
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, prompt TEXT NOT NULL, revised_prompt TEXT,
    provider TEXT, model TEXT, params TEXT NOT NULL DEFAULT '{}', parents TEXT NOT NULL DEFAULT '[]',
    sha256 TEXT NOT NULL, media_type TEXT NOT NULL, ext TEXT NOT NULL, width INTEGER, height INTEGER,
    size_bytes INTEGER NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', text TEXT, search TEXT NOT NULL
);
CREATE TABLE edges (
    child INTEGER NOT NULL REFERENCES entries(id), parent INTEGER NOT NULL REFERENCES entries(id),
    PRIMARY KEY (child, parent)
) WITHOUT ROWID;
CREATE INDEX edges_by_parent ON edges(parent, child);
CREATE INDEX entries_by_sha ON entries(sha256);
PRAGMA user_version = 1;
"""


def legacy_notebook(root: Path, folder: str, images: list[tuple[int, str, list[int]]],
                    created: str = "2025-01-01T00:00:00+00:00") -> dict[int, BinaryResult]:
    """``<root>/.nbimagine/<folder>/`` as nbimagine <= 0.1 left it: ``(seed, prompt, parents)`` per image,
    ids 1, 2, ... in order. Returns id -> image."""
    base = root / ".nbimagine" / folder
    (base / "images").mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(base / "index.sqlite")
    conn.executescript(LEGACY_V1_SCHEMA)
    made = {}
    for number, (seed, prompt, parents) in enumerate(images, start=1):
        image = make_image(seed)
        sha = hashlib.sha256(image.data).hexdigest()
        (base / "images" / sha[:2]).mkdir(exist_ok=True)
        (base / "images" / sha[:2] / f"{sha}.png").write_bytes(image.data)
        stamp = created.replace("00:00:00", f"00:00:{number:02d}")
        conn.execute(
            "INSERT INTO entries (created_at, prompt, provider, model, params, parents, sha256, media_type, ext, "
            "width, height, size_bytes, metadata, search) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (stamp, prompt, "openai", "gpt-image-1", json.dumps({"size": "1024x1024"}), json.dumps(parents), sha,
             "image/png", "png", 32, 24, len(image.data), json.dumps({"media_type": "image/png"}), prompt.casefold()))
        conn.executemany("INSERT INTO edges (child, parent) VALUES (?, ?)", [(number, p) for p in parents])
        made[number] = image
    conn.commit()
    conn.close()
    return made
