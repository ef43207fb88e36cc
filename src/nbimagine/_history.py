"""The per-notebook image history: every generated image, kept next to the notebook.

Layout (``<root>/.nbimagine/<notebook>/``)::

    index.sqlite                       one row per image (WAL mode, so several kernels can write)
    images/<sha[:2]>/<sha256>.<ext>    content-addressed originals; identical bytes share one file
    thumbs/<sha256>_<side>.<jpg|png>   thumbnails, made on first use (PNG when the image has alpha)

Durability rules, in the order ``add`` follows them, all under the write lock: the image goes to
a temp file in its final directory, is fsync'd and renamed into place with ``os.replace`` (atomic),
and only then is the row inserted. A crash at any point therefore leaves either no row, or a row whose file is complete;
at worst an orphan temp file or an image without a row, which :meth:`History.cleanup` removes.

The notebook name comes from :func:`notebook_name`: an explicit :func:`set_notebook` name, else
Jupyter Server's ``JPY_SESSION_NAME``, else VS Code's ``__vsc_ipynb_file__``, else ``"untitled"``.

Nothing heavy is imported here: Pillow is loaded only to make a thumbnail, IPython only read from
``sys.modules`` when it is already loaded.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Union

from ._images import EXTENSIONS, has_alpha, open_reduced, sniff_media_type
from .events import BinaryResult, FrozenDict

__all__ = ["History", "HistoryEntry", "history", "notebook_name", "set_notebook"]

SCHEMA_VERSION = 1
FALLBACK_NOTEBOOK = "untitled"
_DIRNAME = ".nbimagine"
# Long enough to ride out another kernel's write transaction (they are milliseconds long) even on
# a loaded machine; short enough that a truly stuck lock surfaces as an error rather than a hang.
# NBIMAGINE_HISTORY_BUSY_TIMEOUT (seconds) overrides it, read when a history is opened (tests use 0.2).
_BUSY_TIMEOUT_MS = 30_000


def _busy_timeout_ms() -> int:
    try:
        return max(0, round(float(os.environ["NBIMAGINE_HISTORY_BUSY_TIMEOUT"]) * 1000))
    except (KeyError, ValueError):
        return _BUSY_TIMEOUT_MS

ParentRef = Union[int, str, "HistoryEntry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    created_at     TEXT    NOT NULL,                   -- ISO 8601, UTC
    prompt         TEXT    NOT NULL,
    revised_prompt TEXT,
    provider       TEXT,
    model          TEXT,
    params         TEXT    NOT NULL DEFAULT '{}',      -- JSON
    parents        TEXT    NOT NULL DEFAULT '[]',      -- JSON list, in the order given
    sha256         TEXT    NOT NULL,
    media_type     TEXT    NOT NULL,
    ext            TEXT    NOT NULL,
    width          INTEGER,
    height         INTEGER,
    size_bytes     INTEGER NOT NULL,
    metadata       TEXT    NOT NULL DEFAULT '{}',      -- JSON, secrets removed
    text           TEXT,
    search         TEXT    NOT NULL                    -- casefolded prompt + revised prompt
);
CREATE TABLE IF NOT EXISTS edges (
    child  INTEGER NOT NULL REFERENCES entries(id),
    parent INTEGER NOT NULL REFERENCES entries(id),
    PRIMARY KEY (child, parent)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS edges_by_parent ON edges(parent, child);
CREATE INDEX IF NOT EXISTS entries_by_sha ON entries(sha256);
"""

_COLUMNS = (
    "id, created_at, prompt, provider, model, params, parents, sha256, media_type, ext, "
    "width, height, size_bytes, metadata, text"
)


# --------------------------------------------------------------------------------------------
# Notebook name
# --------------------------------------------------------------------------------------------

_explicit_notebook: str | None = None


def set_notebook(name: str | None) -> None:
    """Name the current notebook explicitly (``None`` forgets the name and detects again).

    ``name`` may also be the notebook's path; its last component without ``.ipynb`` is used.

    Useful where the kernel cannot tell which notebook it runs (plain scripts, some test runners).
    An explicit name wins over anything detected from the environment.
    """
    global _explicit_notebook
    if name is not None and not isinstance(name, str):
        raise TypeError(f"set_notebook() takes a str or None, not {type(name).__name__}")
    _explicit_notebook = name or None


def notebook_name() -> str:
    """The name of the running notebook, used to pick its history folder.

    Looked up in this order:

    1. a name given with :func:`set_notebook`;
    2. ``JPY_SESSION_NAME``, which Jupyter Server sets to the notebook's path (its stem is used);
    3. ``__vsc_ipynb_file__`` in the IPython user namespace (VS Code), only if IPython is loaded;
    4. the fallback ``"untitled"`` (plain Python, or a frontend that tells the kernel nothing).

    The result is not sanitized; :class:`History` makes it safe for the filesystem.
    """
    if _explicit_notebook:
        return _stem(_explicit_notebook, any_suffix=False)
    session = os.environ.get("JPY_SESSION_NAME", "").strip()
    if session:
        stem = _stem(session)
        if stem:
            return stem
    vscode = _vscode_notebook()
    if vscode:
        return vscode
    return FALLBACK_NOTEBOOK


def _stem(path: str, any_suffix: bool = True) -> str:
    """The notebook name in a path: last component, without ``.ipynb`` (or, for a path that
    Jupyter gave us, without any suffix: a Jupytext ``analysis.py`` is the notebook ``analysis``)."""
    # Jupyter may hand over a POSIX path or (on Windows) a backslash path; take the last part.
    name = re.split(r"[\\/]", path.rstrip("\\/"))[-1]
    if name.lower().endswith(".ipynb"):
        return name[: -len(".ipynb")]
    return (Path(name).stem or name) if any_suffix else name


def _vscode_notebook() -> str | None:
    ipython = sys.modules.get("IPython")  # never import IPython just to ask
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
    except Exception:  # a half-initialised IPython must not break history lookups
        return None
    if shell is None:
        return None
    value = getattr(shell, "user_ns", {}).get("__vsc_ipynb_file__")
    return _stem(str(value)) if value else None


def _safe_dirname(name: str) -> str:
    """A notebook name turned into one safe path component."""
    name = unicodedata.normalize("NFC", name).strip()
    if name.lower().endswith(".ipynb"):
        name = name[: -len(".ipynb")]
    name = re.sub(r"[^\w.\- ]+", "_", name)  # no separators, no control or shell-special characters
    name = name.strip(" .")  # no "..", no hidden folders, no trailing dot/space (Windows)
    name = name[:120]
    if not name or name.upper().split(".")[0] in _WINDOWS_RESERVED:
        name = f"_{name}" if name else FALLBACK_NOTEBOOK
    return name


_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded image. Rows are immutable, so entries are plain snapshots.

    ``params`` and ``metadata`` are read-only dicts; ``path`` is the full-resolution file.
    """

    id: int
    prompt: str
    provider: str | None
    model: str | None
    params: dict[str, Any]
    parents: tuple[int, ...]
    created_at: datetime
    sha256: str
    media_type: str
    width: int | None
    height: int | None
    size_bytes: int
    path: Path
    metadata: dict[str, Any]
    text: str | None

    # dict fields make the generated hash fail; the id and file identify an entry anyway.
    def __hash__(self) -> int:
        return hash((self.id, self.sha256, str(self.path)))

    @property
    def ref(self) -> str:
        """How to refer to this entry in a prompt or a magic: ``"#17"``."""
        return f"#{self.id}"

    @property
    def revised_prompt(self) -> str | None:
        return self.metadata.get("revised_prompt")

    @property
    def image(self) -> BinaryResult:
        """The full-resolution image (read from disk), with ``history_id`` in its metadata."""
        meta = dict(self.metadata)
        meta.update(
            history_id=self.id,
            media_type=self.media_type,
            provider=self.provider if self.provider is not None else meta.get("provider"),
            model=self.model if self.model is not None else meta.get("model"),
        )
        if self.width and self.height:
            meta["width"], meta["height"] = self.width, self.height
        return BinaryResult(self.path.read_bytes(), {k: v for k, v in meta.items() if v is not None})

    def thumbnail(self, side: int = 192) -> bytes:
        """A thumbnail whose longest side is at most ``side`` pixels (JPEG, or PNG with alpha).

        Made once with Pillow and cached under ``thumbs/``; later calls only read the file.
        """
        return self._thumbnail_path(side).read_bytes()

    def _thumbnail_path(self, side: int) -> Path:
        if not isinstance(side, int) or side < 1:
            raise ValueError(f"thumbnail side must be a positive int, not {side!r}")
        thumbs = self.path.parents[2] / "thumbs"
        for ext in ("jpg", "png"):
            cached = thumbs / f"{self.sha256}_{side}.{ext}"
            if cached.exists():
                return cached
        return _render_thumbnail(self.path, thumbs, self.sha256, side)

    @property
    def caption(self) -> str:
        """``"#17 · provider/model · WxH · prompt…"`` (the prompt cut to 80 characters)."""
        parts = [self.ref]
        who = "/".join(p for p in (self.provider, self.model) if p)
        if who:
            parts.append(who)
        if self.width and self.height:
            parts.append(f"{self.width}x{self.height}")
        prompt = " ".join(self.prompt.split())
        parts.append(prompt if len(prompt) <= 80 else prompt[:79].rstrip() + "…")
        return " · ".join(parts)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        caption = self.caption
        try:
            thumb = self._thumbnail_path(192)
            media = "image/png" if thumb.suffix == ".png" else "image/jpeg"
            src = f"data:{media};base64,{base64.b64encode(thumb.read_bytes()).decode('ascii')}"
            img = (f'<img src="{src}" alt="{html.escape(self.ref)}" '
                   f'style="max-width:192px;max-height:192px;display:block"/>')
        except Exception:  # a missing file or Pillow must not break display of the caption
            img = ""
        figure = (
            f'<figure style="display:inline-block;margin:4px">{img}'
            f'<figcaption style="font-size:0.85em;max-width:320px">{html.escape(caption)}</figcaption>'
            "</figure>"
        )
        return {"text/html": figure, "text/plain": caption}

    def __repr__(self) -> str:
        return f"HistoryEntry({self.caption!r})"


def _render_thumbnail(source: Path, thumbs: Path, sha: str, side: int) -> Path:
    from PIL import ImageOps  # Pillow only when a thumbnail is really needed

    # Decoded under the memory budget (ImageDecodeError for truncated data, bombs, too many pixels).
    im = open_reduced(source.read_bytes(), side)
    im = ImageOps.exif_transpose(im)
    alpha = has_alpha(im)  # an all-opaque RGBA image still gets a JPEG
    im = im.convert("RGBA" if alpha else "RGB")
    buf = io.BytesIO()
    if alpha:
        im.save(buf, "PNG", optimize=True)
    else:
        im.save(buf, "JPEG", quality=85, optimize=True)
    target = thumbs / f"{sha}_{side}.{'png' if alpha else 'jpg'}"
    # A cache file, so no fsync; the rename still keeps readers from seeing a half-written file.
    _atomic_write(target, buf.getvalue(), durable=False)
    return target


# --------------------------------------------------------------------------------------------
# Helpers: files, JSON, secrets
# --------------------------------------------------------------------------------------------


def _atomic_write(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` under ``target`` so that the final name only ever holds complete bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and os.name == "posix":
        # The rename itself must survive a power cut before the row that points at it is committed.
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_SECRET_KEY = re.compile(
    r"api[_-]?key|authorization|secret|passw(or)?d|credential|cookie|(^|[_-])token$|^token$|bearer",
    re.IGNORECASE,
)


def _is_secret_key(key: Any) -> bool:
    # "token" alone or as a suffix is a credential (access_token, ad_token); "max_tokens" is not.
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def _scrub(value: Any) -> Any:
    """A JSON-safe copy of ``value`` without any key that looks like a credential."""
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items() if not _is_secret_key(k)}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        # e.g. Gemini thought signatures: keep them, as text, so the manifest stays JSON.
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(_scrub(value or {}), ensure_ascii=False, separators=(",", ":"), allow_nan=True)


def _slug(text: str, limit: int = 48) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if len(text) > limit:
        text = text[:limit].rsplit("-", 1)[0] or text[:limit]
    return text or "image"


def _parse_ref(ref: ParentRef) -> int:
    if isinstance(ref, HistoryEntry):
        return ref.id
    if isinstance(ref, bool):
        raise TypeError("a history reference must be an id, '#id' or a HistoryEntry, not a bool")
    if isinstance(ref, int):
        return ref
    if isinstance(ref, str) and re.fullmatch(r"\s*#?\d+\s*", ref):
        return int(ref.strip().lstrip("#"))
    raise TypeError(f"a history reference must be an id, '#id' or a HistoryEntry, not {ref!r}")


# --------------------------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------------------------


class History:
    """The image history of one notebook, stored in ``<root>/.nbimagine/<notebook>/``.

    Indexing is by position (oldest first, negatives from the end); :meth:`get` is by id.
    Safe to share between threads of one kernel, and between kernels (processes) writing at once.
    """

    def __init__(self, root: str | os.PathLike[str] = ".", notebook: str | None = None) -> None:
        self.notebook = notebook if notebook else notebook_name()
        self.root = Path(root).expanduser().resolve()
        self.path = self.root / _DIRNAME / _safe_dirname(self.notebook)
        self.path.mkdir(parents=True, exist_ok=True)
        self._images = self.path / "images"
        self._lock = threading.RLock()  # one connection, shared by the kernel's threads
        self._batch_depth = 0
        self._conn = self._connect()
        self.closed = False

    # -- connection and schema -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the write lock
        # up front and waits in busy_timeout instead of failing with SQLITE_BUSY on lock upgrade.
        conn = sqlite3.connect(
            self.path / "index.sqlite",
            timeout=_busy_timeout_ms() / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={_busy_timeout_ms()}")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Two kernels may open a brand-new history at once: take the write lock, then look again.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path / 'index.sqlite'} has schema version {version}, newer than this nbimagine "
                    f"understands ({SCHEMA_VERSION}); upgrade nbimagine"
                )
            if version < 1:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            # Future versions: `if version < 2: ALTER TABLE ...` here, each step in this transaction.
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self.closed = True

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[History]:
        """Group many :meth:`add` calls into one transaction (much faster for bulk imports).

        Other writers wait until the block ends; on an exception nothing in the block is recorded
        (image files already written stay, as unreferenced files that :meth:`cleanup` removes).
        """
        with self._lock, self._transaction():
            yield self

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._batch_depth:
                self._batch_depth += 1
                try:
                    yield self._conn
                finally:
                    self._batch_depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch_depth = 1
            try:
                yield self._conn
            except BaseException:
                self._batch_depth = 0
                if self._conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    self._conn.execute("ROLLBACK")
                raise
            self._batch_depth = 0
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- writing ---------------------------------------------------------------------------------

    def add(
        self,
        image: BinaryResult,
        *,
        prompt: str,
        provider: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        parents: Sequence[ParentRef] = (),
        text: str | None = None,
    ) -> HistoryEntry:
        """Record ``image`` and return its entry.

        ``provider`` and ``model`` default to the image's metadata. ``parents`` are the ids (or
        entries, or ``"#17"``) of the images this one was made from; they must already exist.
        """
        if not isinstance(image, BinaryResult):
            raise TypeError(f"History.add() takes a BinaryResult, not {type(image).__name__}")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        parent_ids = tuple(dict.fromkeys(_parse_ref(p) for p in parents))  # dedupe, keep order
        data = image.data
        sha = hashlib.sha256(data).hexdigest()
        media_type = sniff_media_type(data) or image.metadata.get("media_type") or "application/octet-stream"
        ext = EXTENSIONS.get(media_type, "bin")
        meta = _scrub(dict(image.metadata))
        meta["media_type"] = media_type
        provider = provider if provider is not None else meta.get("provider")
        model = model if model is not None else meta.get("model")
        revised = meta.get("revised_prompt") if isinstance(meta.get("revised_prompt"), str) else None
        width, height = meta.get("width"), meta.get("height")
        width = width if isinstance(width, int) else None
        height = height if isinstance(height, int) else None
        created = datetime.now(timezone.utc)

        params_json = _dumps(params)
        search = "\x1f".join(s.casefold() for s in (prompt, revised or ""))
        with self._transaction() as conn:
            if parent_ids:
                known = {row[0] for row in conn.execute(
                    f"SELECT id FROM entries WHERE id IN ({','.join('?' * len(parent_ids))})", parent_ids)}
                missing = [p for p in parent_ids if p not in known]
                if missing:
                    refs = ", ".join(f"#{m}" for m in missing)
                    raise KeyError(f"parent image {refs} is not in the history of notebook "
                                   f"{self.notebook!r} ({self.path})")
            # Written under the write lock: another kernel's cleanup() would otherwise take the file of
            # this not-yet-inserted row for an orphan (or delete the stored copy it is about to reuse).
            path = self._write_image(sha, ext, data)
            cur = conn.execute(
                "INSERT INTO entries (created_at, prompt, revised_prompt, provider, model, params, parents, "
                "sha256, media_type, ext, width, height, size_bytes, metadata, text, search) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (created.isoformat(), prompt, revised, provider, model, params_json, json.dumps(parent_ids),
                 sha, media_type, ext, width, height, len(data), json.dumps(meta, ensure_ascii=False), text,
                 search),
            )
            entry_id = cur.lastrowid
            if parent_ids:
                conn.executemany("INSERT INTO edges (child, parent) VALUES (?, ?)",
                                 [(entry_id, p) for p in parent_ids])
        assert entry_id is not None
        return HistoryEntry(
            id=entry_id, prompt=prompt, provider=provider, model=model,
            params=FrozenDict(json.loads(params_json)), parents=parent_ids, created_at=created, sha256=sha,
            media_type=media_type, width=width, height=height, size_bytes=len(data), path=path,
            metadata=FrozenDict(meta), text=text,
        )

    def _image_path(self, sha: str, ext: str) -> Path:
        return self._images / sha[:2] / f"{sha}.{ext}"

    def _write_image(self, sha: str, ext: str, data: bytes) -> Path:
        path = self._image_path(sha, ext)
        try:
            if path.stat().st_size == len(data):
                return path  # same bytes already stored (names are content hashes)
        except FileNotFoundError:
            pass
        _atomic_write(path, data, durable=True)
        return path

    def cleanup(self) -> dict[str, int]:
        """Remove leftovers of interrupted writes: temp files, and image files no row refers to.

        Never run automatically (opening must not scan the folder). Returns what was removed.
        """
        removed = {"temp_files": 0, "orphan_images": 0}
        with self._transaction() as conn:  # the write lock keeps other kernels from adding meanwhile
            known = {f"{sha}.{ext}" for sha, ext in conn.execute("SELECT DISTINCT sha256, ext FROM entries")}
            for folder in (self._images, self.path / "thumbs"):
                if not folder.is_dir():
                    continue
                for file in folder.rglob("*"):
                    if not file.is_file():
                        continue
                    if file.name.endswith(".tmp"):
                        file.unlink(missing_ok=True)
                        removed["temp_files"] += 1
                    elif folder == self._images and file.name not in known:
                        file.unlink(missing_ok=True)
                        removed["orphan_images"] += 1
        return removed

    # -- reading ---------------------------------------------------------------------------------

    def _entry(self, row: tuple[Any, ...]) -> HistoryEntry:
        (id_, created, prompt, provider, model, params, parents, sha, media_type, ext,
         width, height, size, metadata, text) = row
        return HistoryEntry(
            id=id_, prompt=prompt, provider=provider, model=model, params=FrozenDict(json.loads(params)),
            parents=tuple(json.loads(parents)), created_at=datetime.fromisoformat(created), sha256=sha,
            media_type=media_type, width=width, height=height, size_bytes=size,
            path=self._image_path(sha, ext), metadata=FrozenDict(json.loads(metadata)), text=text,
        )

    def _select(self, where: str = "", args: Sequence[Any] = (), order: str = "id DESC",
                limit: int = -1, offset: int = 0) -> list[HistoryEntry]:
        sql = f"SELECT {_COLUMNS} FROM entries {where} ORDER BY {order} LIMIT ? OFFSET ?"
        return [self._entry(r) for r in self._query(sql, (*args, limit, offset))]

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM entries")[0][0]

    def __bool__(self) -> bool:
        return bool(self._query("SELECT EXISTS (SELECT 1 FROM entries)")[0][0])

    def __getitem__(self, index: int | slice) -> HistoryEntry | list[HistoryEntry]:
        """By position, oldest first: ``h[0]`` is the first image, ``h[-1]`` the newest."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._select(order="id ASC", limit=max(stop - start, 0), offset=start)
            positions = range(start, stop, step)
            if not positions:
                return []
            lo, hi = min(positions), max(positions)
            chunk = self._select(order="id ASC", limit=hi - lo + 1, offset=lo)
            return [chunk[p - lo] for p in positions if p - lo < len(chunk)]
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"history indices must be ints or slices, not {type(index).__name__} "
                            f"(use .get({index!r}) to look up by id)")
        # Negative positions count from the newest, without a COUNT(*) first.
        rows = (self._select(order="id DESC", limit=1, offset=-index - 1) if index < 0
                else self._select(order="id ASC", limit=1, offset=index))
        if not rows:
            raise IndexError(f"history position {index} out of range ({len(self)} images)")
        return rows[0]

    def __iter__(self) -> Iterator[HistoryEntry]:
        """Oldest first, read in chunks (entries added while iterating are included)."""
        last = 0
        while True:
            chunk = self._select("WHERE id > ?", (last,), order="id ASC", limit=500)
            yield from chunk
            if len(chunk) < 500:
                return
            last = chunk[-1].id

    def __contains__(self, item: object) -> bool:
        try:
            ref = _parse_ref(item)  # type: ignore[arg-type]
        except TypeError:
            return False
        return bool(self._query("SELECT 1 FROM entries WHERE id = ?", (ref,)))

    def get(self, id: int | str) -> HistoryEntry:
        """The entry with this id (``17`` or ``"#17"``); ``KeyError`` if there is none."""
        ref = _parse_ref(id)
        rows = self._select("WHERE id = ?", (ref,))
        if not rows:
            count, lo, hi = self._query("SELECT COUNT(*), MIN(id), MAX(id) FROM entries")[0]
            known = f"ids {lo}..{hi}" if count else "it is empty"
            raise KeyError(f"no image #{ref} in the history of notebook {self.notebook!r} ({known})")
        return rows[0]

    def latest(self, n: int = 50) -> list[HistoryEntry]:
        """The ``n`` newest entries, newest first."""
        return self._select(limit=max(int(n), 0))

    def page(self, page: int, per_page: int = 24) -> list[HistoryEntry]:
        """Page ``page`` (0-based) of ``per_page`` entries, newest first; ``[]`` past the end."""
        if page < 0 or per_page < 1:
            raise ValueError(f"page must be >= 0 and per_page >= 1 (got page={page}, per_page={per_page})")
        return self._select(limit=per_page, offset=page * per_page)

    def page_count(self, per_page: int = 24) -> int:
        """How many pages :meth:`page` has (at least 1, so an empty gallery shows one empty page)."""
        return max(1, -(-len(self) // per_page))

    def search(self, query: str, limit: int | None = None) -> list[HistoryEntry]:
        """Entries whose prompt or revised prompt contains ``query`` (case-insensitive), newest first."""
        needle = query.casefold()
        return self._select("WHERE instr(search, ?) > 0", (needle,), limit=-1 if limit is None else limit)

    def lineage(self, id: int | str | HistoryEntry) -> list[HistoryEntry]:
        """Every ancestor of entry ``id`` and the entry itself, oldest first.

        With several parents the chains are merged without duplicates. Parents always exist before
        their children (``add`` checks), so id order is a valid topological order.
        """
        ref = _parse_ref(id)
        self.get(ref)  # a clear KeyError for an unknown id
        rows = self._query(
            f"""WITH RECURSIVE anc(id) AS (
                    SELECT ? UNION SELECT parent FROM edges JOIN anc ON edges.child = anc.id)
                SELECT {_COLUMNS} FROM entries WHERE id IN (SELECT id FROM anc) ORDER BY id ASC""",
            (ref,),
        )
        return [self._entry(r) for r in rows]

    def children(self, id: int | str | HistoryEntry) -> list[HistoryEntry]:
        """The entries made directly from entry ``id``, oldest first."""
        ref = _parse_ref(id)
        return self._select("WHERE id IN (SELECT child FROM edges WHERE parent = ?)", (ref,), order="id ASC")

    # -- export ------------------------------------------------------------------------------------

    def export(self, directory: str | os.PathLike[str],
               entries: Sequence[HistoryEntry] | None = None) -> list[Path]:
        """Copy full-resolution images to ``directory`` as ``<id>-<slug>.<ext>``, plus ``history.json``.

        ``entries`` defaults to the whole history. Returns the image paths, then the manifest.
        """
        target = Path(directory).expanduser()
        target.mkdir(parents=True, exist_ok=True)
        chosen = list(self) if entries is None else list(entries)
        written: list[Path] = []
        manifest = []
        for e in chosen:
            out = target / f"{e.id}-{_slug(e.prompt)}{e.path.suffix}"
            shutil.copyfile(e.path, out)
            written.append(out)
            manifest.append({
                "id": e.id, "file": out.name, "prompt": e.prompt, "revised_prompt": e.revised_prompt,
                "provider": e.provider, "model": e.model, "params": dict(e.params),
                "parents": list(e.parents),
                "created_at": e.created_at.isoformat(), "sha256": e.sha256, "media_type": e.media_type,
                "width": e.width, "height": e.height, "size_bytes": e.size_bytes, "text": e.text,
                "metadata": dict(e.metadata),
            })
        doc = {"notebook": self.notebook, "exported_at": datetime.now(timezone.utc).isoformat(),
               "schema_version": SCHEMA_VERSION, "entries": manifest}
        man = target / "history.json"
        man.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
        written.append(man)
        return written

    def __repr__(self) -> str:
        return f"History({self.notebook!r}, {len(self)} images, {str(self.path)!r})"


# --------------------------------------------------------------------------------------------
# The current notebook's history
# --------------------------------------------------------------------------------------------

_cache: dict[tuple[Path, str], History] = {}
_cache_lock = threading.Lock()


def history(notebook: str | None = None, root: str | os.PathLike[str] | None = None) -> History:
    """The history of the current notebook (or of ``notebook``), under ``root`` (default: the cwd).

    Jupyter starts a kernel in its notebook's folder, so the default root puts ``.nbimagine/`` next
    to the notebook. One :class:`History` per (root, notebook) is kept and reused.
    """
    name = notebook or notebook_name()
    base = Path(root if root is not None else os.getcwd()).expanduser().resolve()
    key = (base, _safe_dirname(name))
    with _cache_lock:
        found = _cache.get(key)
        if found is None or found.closed:  # closed by a `with history() as h:` block
            found = _cache[key] = History(base, name)
        return found


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL: readers and one writer work at once, and NORMAL sync stays crash-safe.

    When two kernels open a brand-new history at the same moment, SQLite answers the mode switch
    with "database is locked" at once, without calling the busy handler, so wait and retry here.
    """
    deadline = time.monotonic() + _busy_timeout_ms() / 1000
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
