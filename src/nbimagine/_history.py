"""The image history: every image made in the notebooks of a folder, kept next to them.

One store per folder, ``<root>/.nbimagine/``::

    index.sqlite                       one row per image with its notebook (SQLite, WAL: several kernels write)
    images/<sha[:2]>/<sha256>.<ext>    content-addressed originals; identical bytes share one file
    records/<id // 1000>/<id>.json     one small record per image, written before the row is committed:
                                       everything needed to rebuild a lost or corrupt index (repair)
    notebooks/<uid>.json               one record per notebook, holding its current name
    jobs/<id>.json, <id>.lines.json    one record per batch job (its state, then its prompts, written once)
    thumbs/<sha256>_<side>.<jpg|png>   thumbnails, made on first use
    .v1/<notebook>/                    the per-notebook indexes of nbimagine <= 0.1, kept after migration
    .broken/                           indexes replaced by a repair, kept for inspection

**Ids** are unique in the folder and never reused: ``#17`` in a caption means that one image, in
every notebook of the folder, after restarts and renames. Each :class:`History` is the view of one
notebook: positions (``h[-1]``, ``last``), ``len``, listings and search see only that notebook's
images; an explicit id (``get``, ``lineage``, ``-e #17``) finds the image wherever it was made.

**Notebooks** are rows with a stable uid; a rename (followed through the Jupyter server, see
:mod:`._notebook`) changes the row's name, so the images go with the notebook.

**Durability**, in the order :meth:`History.add` follows it, under the write lock: the image goes to a
temp file that is fsync'd and renamed into place, then its record likewise, and only then is the row
committed. A crash leaves at worst a complete image and record without a row; the next ``add`` or a
repair adopts it, under the id it was given.

**File-system boundary**: every path is built from validated pieces (a 64-hex sha256, a known
extension, a numeric id, a hex uid) and opened through :mod:`._files`, so nothing below
``.nbimagine`` is followed through a symlink to read, write or delete, and image bytes are checked
against their sha256 when read. Rows or records that are not well-formed are refused.

**Schema changes**: bump ``SCHEMA_VERSION`` and add ``_MIGRATIONS[n]``, which takes an index of
version n-1 to n. Pending steps run in one transaction when a store is opened; a repair builds the
newest schema by running them all from an empty file. Records carry their own ``"record"`` version
and are read leniently (unknown fields kept in ``metadata`` are ignored).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import hashlib
import html
import io
import json
import math
import os
import re
import secrets
import socket
import sqlite3
import stat
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from . import _notebook
from ._files import Folder
from ._images import EXTENSIONS, has_alpha, open_reduced, sniff_media_type
from ._notebook import NotebookIdentity, normalize_name, notebook_name, set_notebook
from .errors import HistoryError
from .events import BinaryResult, FrozenDict

if TYPE_CHECKING:
    from ._cost import CostReport

__all__ = ["History", "HistoryEntry", "JobLine", "JobRecord", "RepairReport", "history", "notebook_name",
           "repair_history", "set_history_root", "set_notebook"]

# 1 was the per-notebook index of nbimagine <= 0.1 (imported by _import_legacy); 3 adds budgets, 4 batch jobs.
SCHEMA_VERSION = 4
RECORD_VERSION = 1
APPLICATION_ID = 0x6E62696D  # "nbim": tells our index from any other SQLite file
_DIRNAME = ".nbimagine"
_INDEX = "index.sqlite"
_INDEX_FILES = (_INDEX, f"{_INDEX}-wal", f"{_INDEX}-shm", f"{_INDEX}-journal")
# Long enough to ride out another kernel's write transaction (milliseconds) on a loaded machine;
# short enough that a stuck lock surfaces as an error rather than a hang.
# NBIMAGINE_HISTORY_BUSY_TIMEOUT (seconds) overrides it, read when a history is opened.
DEFAULT_TIMEOUT = 30.0
_BUCKET = 1000  # records per folder
_MAX_ID = 10**18 - 1  # the largest id a record name can hold (_RECORD_NAME); SQLite's own limit is 2**63 - 1
_MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()} | {"bin": "application/octet-stream"}
_SHA = re.compile(r"[0-9a-f]{64}")
_RECORD_NAME = re.compile(r"([1-9][0-9]{0,17})\.json")
_NOTEBOOK_UID = re.compile(r"[0-9a-f]{16}")
_IMAGE_NAME = re.compile(r"([0-9a-f]{64})\.(png|jpg|webp|gif|bin)")
_THUMB_NAME = re.compile(r"([0-9a-f]{64})_[1-9][0-9]{0,5}\.(jpg|png)")
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
_REBUILD_NAME = re.compile(r"index\.sqlite\.rebuild-[0-9a-f]{8}")  # left by a repair that was killed
_LEGACY_MEMBERS = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal", "images",
                   "thumbs")
_RESERVED = {"images", "thumbs", "records", "notebooks", "jobs"}
_JOB_NAME = re.compile(r"([0-9a-f]{12})\.json")
_JOB_LINES_NAME = re.compile(r"([0-9a-f]{12})\.lines\.json")
_LEGACY_PREFIX = ".legacy-"

FIX_REPAIR = ("Run %imagine history --repair (nbimagine.repair_history()) to rebuild the index from the image records, "
              "or generate with --no-history, or use another folder (%imagine history --root DIR)")
FIX_ELSEWHERE = ("Generate with --no-history, or keep the history in a writable folder "
                 "(%imagine history --root DIR, or nbimagine.history(root=...))")

_FIX_EXPORT = ("Export to another folder, or move away what stands in the way there (a file or folder of the "
               "same name); the history itself is fine")

ParentRef = Union[int, str, "HistoryEntry"]

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

_SCHEMA_V2 = """
CREATE TABLE notebooks (
    id         INTEGER PRIMARY KEY,
    uid        TEXT    NOT NULL UNIQUE,        -- names notebooks/<uid>.json, never changes
    name       TEXT    NOT NULL UNIQUE,        -- the notebook's current name (its file stem)
    created_at TEXT    NOT NULL
);
CREATE TABLE entries (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    notebook_id    INTEGER NOT NULL REFERENCES notebooks(id),
    created_at     TEXT    NOT NULL,                   -- ISO 8601, UTC
    prompt         TEXT    NOT NULL,
    revised_prompt TEXT,
    provider       TEXT,
    model          TEXT,
    params         TEXT    NOT NULL DEFAULT '{}',      -- JSON
    parents        TEXT    NOT NULL DEFAULT '[]',      -- JSON list of ids, in the order given
    sha256         TEXT    NOT NULL CHECK (length(sha256) = 64 AND sha256 NOT GLOB '*[^0-9a-f]*'),
    ext            TEXT    NOT NULL CHECK (ext IN ('png', 'jpg', 'webp', 'gif', 'bin')),
    width          INTEGER,
    height         INTEGER,
    size_bytes     INTEGER NOT NULL,
    metadata       TEXT    NOT NULL DEFAULT '{}',      -- JSON, secrets removed
    text           TEXT,
    search         TEXT    NOT NULL,                   -- casefolded prompt + revised prompt
    legacy_folder  TEXT,                               -- migrated from .nbimagine/<legacy_folder>/ ...
    legacy_id      INTEGER                             -- ... where its id was legacy_id
);
CREATE INDEX entries_by_notebook ON entries(notebook_id, id);
CREATE INDEX entries_by_sha ON entries(sha256);
CREATE INDEX entries_by_legacy_id ON entries(notebook_id, legacy_id) WHERE legacy_id IS NOT NULL;
CREATE UNIQUE INDEX entries_by_origin ON entries(legacy_folder, legacy_id) WHERE legacy_folder IS NOT NULL;
CREATE TABLE edges (
    child  INTEGER NOT NULL REFERENCES entries(id),
    parent INTEGER NOT NULL REFERENCES entries(id),
    PRIMARY KEY (child, parent)
) WITHOUT ROWID;
CREATE INDEX edges_by_parent ON edges(parent, child);
CREATE TABLE kernels (                                 -- the notebook each Jupyter kernel last wrote for
    kernel_id   TEXT    PRIMARY KEY,
    notebook_id INTEGER NOT NULL REFERENCES notebooks(id),
    seen_at     TEXT    NOT NULL
) WITHOUT ROWID;
"""


def _schema_v2(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V2.split(";"):
        if statement.strip():
            conn.execute(statement)


def _schema_v3(conn: sqlite3.Connection) -> None:
    # The notebook's spending budget (%imagine budget), on its row so that it follows renames.
    conn.execute("ALTER TABLE notebooks ADD COLUMN budget_usd REAL")


# Version 4: batch jobs (``nbimagine.submit_batch``), stored the moment they are created so that they
# survive a kernel restart, and their lines, whose ``outcome`` makes collecting results idempotent
# (one row per job + custom_id, updated in the transaction that adds the line's images).
_SCHEMA_V4 = """
CREATE TABLE jobs (
    id           TEXT    PRIMARY KEY,                -- nbimagine's own id, known before the provider's
    notebook_id  INTEGER NOT NULL REFERENCES notebooks(id),
    job_id       TEXT    UNIQUE,                     -- the provider's id (NULL while submitting)
    provider     TEXT    NOT NULL,                   -- the name it was submitted with (openai, gemini, ...)
    kind         TEXT    NOT NULL,                   -- provider family: openai, azure, gemini, vertex
    model        TEXT,
    params       TEXT    NOT NULL DEFAULT '{}',      -- JSON, as recorded on each image
    parents      TEXT    NOT NULL DEFAULT '[]',      -- JSON list of ids
    connection   TEXT    NOT NULL DEFAULT '{}',      -- JSON, public config fields to reconnect (no secrets)
    state        TEXT    NOT NULL,                   -- submitting, then the provider's state, then collected
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    collected_at TEXT,
    total        INTEGER NOT NULL
);
CREATE INDEX jobs_by_notebook ON jobs(notebook_id, created_at);
CREATE TABLE job_lines (
    job       TEXT    NOT NULL REFERENCES jobs(id),
    custom_id TEXT    NOT NULL,
    position  INTEGER NOT NULL,
    prompt    TEXT    NOT NULL,
    outcome   TEXT    CHECK (outcome IN ('done', 'failed')),  -- NULL while not collected
    entries   TEXT    NOT NULL DEFAULT '[]',                  -- JSON list of entry ids
    error     TEXT,
    PRIMARY KEY (job, custom_id)
) WITHOUT ROWID;
"""


def _schema_v4(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V4.split(";"):
        if statement.strip():
            conn.execute(statement)


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _schema_v2, 3: _schema_v3, 4: _schema_v4}
_REQUIRED_COLUMNS = {"notebooks": {"id", "uid", "name", "budget_usd"},
                     "entries": {"id", "notebook_id", "prompt", "params", "parents", "sha256", "ext", "metadata"},
                     "edges": {"child", "parent"}, "kernels": {"kernel_id", "notebook_id"},
                     "jobs": {"id", "notebook_id", "job_id", "provider", "kind", "params", "connection", "state",
                              "total"},
                     "job_lines": {"job", "custom_id", "position", "prompt", "outcome", "entries"}}
_JOB_COLUMNS = ("j.id, j.job_id, j.provider, j.kind, j.model, j.params, j.parents, j.connection, j.state, "
                "j.created_at, j.updated_at, j.collected_at, j.total, n.name")
_JOB_FROM = "FROM jobs j JOIN notebooks n ON n.id = j.notebook_id"

_COLUMNS = ("e.id, e.created_at, e.prompt, e.provider, e.model, e.params, e.parents, e.sha256, e.ext, "
            "e.width, e.height, e.size_bytes, e.metadata, e.text, n.name")
_FROM = "FROM entries e JOIN notebooks n ON n.id = e.notebook_id"
# Spending per local day, provider and billed model(s), from each image's metadata: cost_usd is its share of
# its reply's cost, cost_simulated marks the emulator's figures, budget_charge_usd is what a budget counts for
# an image of unknown cost (its request's estimated high end). Masks painted in a notebook are inputs. A
# negative figure (a tampered or foreign record) counts as nothing: it must not give a budget back.
_COST_SQL = """
SELECT date(e.created_at, 'localtime'), coalesce(e.provider, '?'),
       coalesce(e.model, '?') || coalesce(' + ' || json_extract(e.metadata, '$.image_model'), ''),
       count(*), sum(max(json_extract(e.metadata, '$.cost_usd'), 0)),
       sum(CASE WHEN json_extract(e.metadata, '$.cost_simulated')
                THEN max(json_extract(e.metadata, '$.cost_usd'), 0) END),
       sum(json_extract(e.metadata, '$.cost_usd') IS NULL),
       sum(CASE WHEN json_extract(e.metadata, '$.cost_usd') IS NULL
                THEN max(json_extract(e.metadata, '$.budget_charge_usd'), 0) END)
FROM entries e {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
_IN_NOTEBOOK = "e.notebook_id = (SELECT id FROM notebooks WHERE name = ?)"


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded image. Rows are immutable, so entries are plain snapshots.

    ``params`` and ``metadata`` are read-only dicts; ``path`` is the full-resolution file;
    ``notebook`` the name of the notebook it was made in (its current name).
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
    notebook: str | None = None
    _store: Any = field(default=None, compare=False, repr=False)

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
    def ext(self) -> str:
        return self.path.suffix[1:]

    @property
    def image(self) -> BinaryResult:
        """The full-resolution image, read from disk and checked against its sha256.

        Its metadata carries ``history_id``. ``HistoryError`` when the file is missing, is a
        symlink, or does not hold the recorded bytes.
        """
        meta = dict(self.metadata)
        meta.update(
            history_id=self.id,
            media_type=self.media_type,
            provider=self.provider if self.provider is not None else meta.get("provider"),
            model=self.model if self.model is not None else meta.get("model"),
        )
        if self.width and self.height:
            meta["width"], meta["height"] = self.width, self.height
        return BinaryResult(self._read(), {k: v for k, v in meta.items() if v is not None})

    def __getstate__(self) -> dict[str, Any]:
        # The store (a SQLite connection, open folders, a lock) stays in this process; an unpickled
        # entry reads its file by path, with the same checks (see _read).
        return {**self.__dict__, "_store": None}

    def _read(self) -> bytes:
        if self._store is not None:
            return self._store.read_image(self.sha256, self.ext, entry_id=self.id)
        # No store (an unpickled entry): from .nbimagine down, no link is followed, as the store does.
        @contextlib.contextmanager
        def sub(*names: str) -> Iterator[Folder]:
            with Folder.open(self.path.parents[2], create=False) as base, base.descend(*names) as folder:
                yield folder

        return _read_image(sub, self.sha256, self.ext, self.id, self.path)

    def thumbnail(self, side: int = 192) -> bytes:
        """A thumbnail whose longest side is at most ``side`` pixels (JPEG, or PNG with alpha).

        Made once with Pillow and cached under ``thumbs/``; later calls only read the file.
        """
        if not isinstance(side, int) or isinstance(side, bool) or side < 1:
            raise ValueError(f"thumbnail side must be a positive int, not {side!r}")
        if self._store is not None:
            return self._store.thumbnail(self.sha256, self.ext, side, entry_id=self.id)
        return _render_thumbnail(self._read(), side)[0]

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


    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        caption = self.caption
        try:
            thumb = self.thumbnail(192)
            media = sniff_media_type(thumb) or "image/jpeg"
            src = f"data:{media};base64,{base64.b64encode(thumb).decode('ascii')}"
            img = (f'<img src="{src}" alt="{html.escape(self.ref)}" '
                   f'style="max-width:192px;max-height:192px;display:block"/>')
        except Exception:  # a missing file or Pillow must not break display of the caption
            img = ""
        figure = (
            f'<figure style="display:inline-block;margin:4px">{img}'
            f'<figcaption style="font-size:0.85em;max-width:320px">{html.escape(caption)}</figcaption>'
            "</figure>"
        )
        return {"text/html": figure, "text/plain": caption}, {"nbimagine": output_ids(self.id, self.sha256, self.ext)}

    def __repr__(self) -> str:
        return f"HistoryEntry({self.caption!r})"


def output_ids(history_id: int | None, sha256: str, ext: str) -> dict[str, Any]:
    """What a display output carries under ``metadata["nbimagine"]`` for the image it shows.

    ``{"sha256": ..., "history_id": 17, "file": ".nbimagine/images/ab/ab….png"}`` (the last two when
    the image is in a history; ``file`` is relative to the folder holding ``.nbimagine``), so a saved
    notebook can be linked back to the full-resolution files. An output showing several images
    (a gallery) carries ``{"images": [<one of these per image>]}``.
    """
    ids: dict[str, Any] = {"sha256": sha256}
    if history_id is not None:
        ids["history_id"] = history_id
        if _SHA.fullmatch(sha256 or "") and ext in _MEDIA_TYPES:
            ids["file"] = f"{_DIRNAME}/images/{sha256[:2]}/{sha256}.{ext}"
    return ids


def _verified(data: bytes, sha: str, where: object, entry_id: int | None) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha:
        raise HistoryError(f"The image file of {_label(entry_id)} does not hold the recorded image", path=where,
                           cause="its sha256 differs, so it was replaced or damaged; it is not shown",
                           fix="Restore the file, or delete it and accept that the image is gone")
    return data


def _read_image(sub: Callable[..., contextlib.AbstractContextManager[Folder]], sha: str, ext: str,
                entry_id: int | None, path: Path) -> bytes:
    """The checked bytes of image ``images/<sha[:2]>/<sha>.<ext>`` (``path``, for messages); ``sub(*names)``
    opens a folder below ``.nbimagine`` without following links."""
    _check_sha_ext(sha, ext, entry_id)
    try:
        with sub("images", sha[:2]) as folder:
            data = folder.read(f"{sha}.{ext}")
    except FileNotFoundError as exc:
        raise HistoryError(f"The image file of {_label(entry_id)} is missing", path=path,
                           cause="it was moved or deleted outside nbimagine",
                           fix="Restore the file; the entry's prompt and lineage are still in the history") from exc
    except OSError as exc:
        raise _error(exc, f"Refusing to read the image file of {_label(entry_id)}", path) from exc
    return _verified(data, sha, path, entry_id)


def _label(entry_id: int | None) -> str:
    return f"#{entry_id}" if entry_id is not None else "this entry"


def _render_thumbnail(data: bytes, side: int) -> tuple[bytes, str]:
    from PIL import ImageOps  # Pillow only when a thumbnail is really needed

    # Decoded under the memory budget (ImageDecodeError for truncated data, bombs, too many pixels).
    im = open_reduced(data, side)
    im = ImageOps.exif_transpose(im)
    alpha = has_alpha(im)  # an all-opaque RGBA image still gets a JPEG
    im = im.convert("RGBA" if alpha else "RGB")
    buf = io.BytesIO()
    if alpha:
        im.save(buf, "PNG", optimize=True)
    else:
        im.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue(), "png" if alpha else "jpg"


# --------------------------------------------------------------------------------------------
# Helpers: JSON, secrets, references, errors
# --------------------------------------------------------------------------------------------

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
    # ASCII escapes: a lone surrogate from a provider's text cannot break the UTF-8 of the index.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=True)


def _text(value: str | None) -> str | None:
    """``value`` storable as UTF-8 (a lone surrogate becomes U+FFFD)."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


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


def _int64(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-(2**63), min(value, 2**63 - 1))
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _busy_timeout() -> float:
    try:
        return max(0.0, float(os.environ["NBIMAGINE_HISTORY_BUSY_TIMEOUT"]))
    except (KeyError, ValueError):
        return DEFAULT_TIMEOUT


def _read_only_reason(folder: Path) -> str | None:
    """Why nothing can be written in ``folder``, or None when it is writable."""
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "the file system is mounted read-only"
    if not os.access(folder, os.W_OK):
        return "no permission to write in this folder"
    return None


def _error(exc: BaseException, what: str, path: object, *, timeout: float = DEFAULT_TIMEOUT,
           folder: Path | None = None, fix: str | None = None) -> HistoryError:
    """``exc`` (sqlite3 or OS) as a ``HistoryError`` that names the file, the real cause and the fix.

    ``fix``: for a file outside the history (an export's folder): the history is fine, so the fixes that
    repair it do not apply; the OS's own cause is given with this fix instead.
    """
    if isinstance(exc, HistoryError):
        return exc
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if fix is not None:
        cause = (f"{os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]"
                 if isinstance(exc, OSError) and exc.errno is not None else text)
        return HistoryError(what, path=path, cause=cause, fix=fix)
    if isinstance(exc, OSError) and exc.errno is not None:
        cause = f"{os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return HistoryError(what, path=path, cause=cause, fix="Free some disk space, then try again; "
                                "or generate with --no-history")
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return HistoryError(what, path=path, cause=cause, fix=FIX_ELSEWHERE)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return HistoryError(what, path=path, cause=f"{cause}: a symlink or a file stands where the history "
                                "expects a folder or file, and is never followed",
                                fix="Remove it, then run %imagine history --repair")
        return HistoryError(what, path=path, cause=cause, fix=FIX_REPAIR)
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return HistoryError(what, path=path, cause=f"the index is damaged ({text})", fix=FIX_REPAIR)
    if "locked" in low or "busy" in low:
        return HistoryError(what, path=path, cause=f"another kernel or program has held the history's write lock "
                            f"for more than {timeout:g} s ({text})",
                            fix="Close or wait for the other program, or generate with --no-history")
    if "full" in low:
        return HistoryError(what, path=path, cause=f"the disk is full ({text})",
                            fix="Free some disk space, then try again; or generate with --no-history")
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        reason = _read_only_reason(folder) if folder is not None else None
        cause = f"{reason} ({text})" if reason else text
        return HistoryError(what, path=path, cause=cause, fix=FIX_ELSEWHERE if reason else FIX_REPAIR)
    if "no such table" in low or "no such column" in low:
        return HistoryError(what, path=path, cause=f"the index does not have nbimagine's tables ({text})",
                            fix=FIX_REPAIR)
    return HistoryError(what, path=path, cause=f"{type(exc).__name__}: {text}", fix=FIX_REPAIR)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json(text: object, kind: type) -> Any:
    """A JSON column or field of type ``kind``; ``ValueError`` for anything else (also nesting deep
    enough to exhaust the parser's recursion, which a hand-edited row can hold)."""
    if not isinstance(text, str):
        raise TypeError(f"expected JSON text, not {type(text).__name__}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, kind):
        raise TypeError(f"expected a JSON {kind.__name__}, not {type(value).__name__}")
    return value


def _check_sha_ext(sha: object, ext: object, entry_id: object) -> None:
    if not (isinstance(sha, str) and _SHA.fullmatch(sha) and isinstance(ext, str) and ext in _MEDIA_TYPES):
        raise HistoryError(f"History row #{entry_id} is malformed and was refused",
                           cause=f"sha256={str(sha)[:80]!r}, ext={str(ext)[:20]!r} do not name an image file",
                           fix=FIX_REPAIR)


def _bucket(entry_id: int) -> str:
    return f"{entry_id // _BUCKET:04d}"


# --------------------------------------------------------------------------------------------
# Records (one JSON file per image, the source of truth for a repair)
# --------------------------------------------------------------------------------------------


def _record(entry_id: int, *, notebook_uid: str, notebook: str, created_at: str, prompt: str,
            revised_prompt: str | None, provider: str | None, model: str | None, params: str, parents: Sequence[int],
            sha256: str, ext: str, width: int | None, height: int | None, size_bytes: int, metadata: str,
            text: str | None, legacy_folder: str | None = None, legacy_id: int | None = None) -> bytes:
    doc = {
        "record": RECORD_VERSION, "id": entry_id, "notebook": {"uid": notebook_uid, "name": notebook},
        "created_at": created_at, "prompt": prompt, "revised_prompt": revised_prompt, "provider": provider,
        "model": model, "params": json.loads(params), "parents": list(parents), "sha256": sha256, "ext": ext,
        "width": width, "height": height, "size_bytes": size_bytes, "metadata": json.loads(metadata),
        "text": text,
    }
    if legacy_folder is not None:
        doc["legacy"] = {"folder": legacy_folder, "id": legacy_id}
    return _dumps(doc).encode("ascii")


def _parse_record(data: bytes, entry_id: int) -> dict[str, Any] | None:
    """A record as a dict of column values, or None when it is not a well-formed record of ``entry_id``."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not _is_int(entry_id) or not 0 < entry_id <= _MAX_ID:
        return None
    if not isinstance(doc, dict) or doc.get("id") != entry_id or not isinstance(doc.get("record"), int):
        return None
    notebook = doc.get("notebook")
    legacy = doc.get("legacy") if isinstance(doc.get("legacy"), dict) else {}
    out = {
        "id": entry_id, "created_at": doc.get("created_at"), "prompt": doc.get("prompt"),
        "revised_prompt": doc.get("revised_prompt"), "provider": doc.get("provider"), "model": doc.get("model"),
        "params": doc.get("params", {}), "parents": doc.get("parents", []), "sha256": doc.get("sha256"),
        "ext": doc.get("ext"), "width": doc.get("width"), "height": doc.get("height"),
        "size_bytes": doc.get("size_bytes"), "metadata": doc.get("metadata", {}), "text": doc.get("text"),
        "notebook_uid": notebook.get("uid") if isinstance(notebook, dict) else None,
        "notebook": notebook.get("name") if isinstance(notebook, dict) else None,
        "legacy_folder": legacy.get("folder"), "legacy_id": legacy.get("id"),
    }
    checks = (
        isinstance(out["created_at"], str), isinstance(out["prompt"], str),
        isinstance(out["sha256"], str) and bool(_SHA.fullmatch(out["sha256"])), out["ext"] in _MEDIA_TYPES,
        isinstance(out["params"], dict), isinstance(out["metadata"], dict),
        isinstance(out["parents"], list) and all(_is_int(p) and 0 < p <= _MAX_ID for p in out["parents"]),
        isinstance(out["size_bytes"], int), isinstance(out["notebook"], str) and bool(out["notebook"]),
        all(out[k] is None or isinstance(out[k], str) for k in ("revised_prompt", "provider", "model", "text",
                                                                 "notebook_uid", "legacy_folder")),
        all(out[k] is None or (isinstance(out[k], int) and not isinstance(out[k], bool))
            for k in ("width", "height", "legacy_id")),
    )
    if not all(checks):
        return None
    try:
        datetime.fromisoformat(out["created_at"])
    except ValueError:
        return None
    return out


@dataclass
class RepairReport:
    """What :meth:`History.repair` did."""

    entries: int = 0
    notebooks: int = 0
    from_records: int = 0
    from_old_index: int = 0
    refused_records: list[str] = field(default_factory=list)
    missing_images: list[int] = field(default_factory=list)
    old_index: Path | None = None
    index: Path | None = None
    jobs: int = 0

    def __str__(self) -> str:
        text = (f"Rebuilt {self.index}: {self.entries} image(s) in {self.notebooks} notebook(s), "
                f"{self.from_records} from their records")
        if self.jobs:
            text += f", {self.jobs} batch job(s)"
        if self.from_old_index:
            text += f", {self.from_old_index} from the old index (they had no record; one was written)"
        text += "."
        if self.old_index:
            text += f" The old index was kept as {self.old_index}."
        if self.refused_records:
            text += (f" {len(self.refused_records)} record file(s) were not well-formed and were left out: "
                     f"{', '.join(self.refused_records[:5])}{'…' if len(self.refused_records) > 5 else ''}.")
        if self.missing_images:
            ids = ", ".join(f"#{i}" for i in self.missing_images[:10])
            text += (f" {len(self.missing_images)} image file(s) are missing ({ids}"
                     f"{'…' if len(self.missing_images) > 10 else ''}): their prompts and lineage are kept.")
        return text


# --------------------------------------------------------------------------------------------
# The store: one per folder, shared by the views of its notebooks
# --------------------------------------------------------------------------------------------


class _Store:
    """The index, files and records under ``<root>/.nbimagine``. Thread-safe; one SQLite connection."""

    def __init__(self, root: Path, *, timeout: float | None = None, connect: bool = True) -> None:
        self.root = root
        self.timeout = _busy_timeout() if timeout is None else timeout
        self.read_only = False
        self.closed = False
        self._lock = threading.RLock()
        self._depth = 0
        self._deferred_sync = False
        self._written: list[int] = []  # records written by the open transaction (removed if it rolls back)
        self._conn: sqlite3.Connection | None = None
        self._index_key: tuple[int, int] | None = None
        target = root / _DIRNAME
        try:
            self.dir = Folder.open(target, create=not target.is_dir())
        except OSError as exc:
            raise _error(exc, "Cannot open the image history folder", target, folder=root) from exc
        self.path = self.dir.path
        self.index = self.path / _INDEX
        if connect:
            try:
                self._connect()
            except BaseException:
                self.dir.close()
                raise

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> None:
        d = self.dir
        st = d.lstat(_INDEX)
        if st is not None and stat.S_ISDIR(st.st_mode):
            # nbimagine <= 0.1 kept a notebook called "index.sqlite" in a folder of that name.
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                d.rename(_INDEX, _LEGACY_PREFIX + _INDEX)
            st = d.lstat(_INDEX)
        for name in _INDEX_FILES:
            found = d.lstat(name)
            if found is not None and not stat.S_ISREG(found.st_mode):
                kind = "a symlink" if stat.S_ISLNK(found.st_mode) else "not a regular file"
                raise HistoryError("Refusing to open the history index", path=self.path / name,
                                   cause=f"it is {kind}, and the history never follows links",
                                   fix="Remove it, then run %imagine history --repair")
        if (st is None or st.st_size == 0) and self._has_content():
            state = "missing" if st is None else "empty (0 bytes)"
            raise HistoryError(f"The history index is {state} but image records exist", path=self.index,
                               cause="opening it as a new history would reuse ids and hide the images",
                               fix="Run %imagine history --repair (nbimagine.repair_history()) to rebuild it "
                                   "from the records")
        conn = None
        try:
            conn = self._open_connection()
            self._check_schema(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise _error(exc, "Cannot open the history index", self.index, timeout=self.timeout,
                         folder=self.path) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        found = d.lstat(_INDEX)
        self._index_key = (found.st_dev, found.st_ino) if found is not None else None
        if not self.read_only:
            legacy = self._legacy_folders()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION or legacy:
                self._migrate(legacy)

    def _open_connection(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the write lock
        # up front and waits in busy_timeout instead of failing with SQLITE_BUSY on lock upgrade.
        conn = sqlite3.connect(self.index, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            conn.execute("PRAGMA user_version").fetchone()  # the first read: a damaged file fails here
            _enable_wal(conn, self.timeout)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        except sqlite3.Error as exc:
            conn.close()
            if _read_only_reason(self.path) is None or not self.index.exists():
                raise
            first = exc
        # A read-only folder or file system: the history can still be looked at.
        for uri in (f"file:{self.index}?mode=ro", f"file:{self.index}?immutable=1"):
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.Error:
                conn.close()
                continue
            self.read_only = True
            return conn
        raise first

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        # One statement, so one snapshot: read one by one, another kernel creating the same history could
        # commit in between, and its new tables without the application_id read before looked foreign.
        app, version, names = conn.execute(
            "SELECT (SELECT application_id FROM pragma_application_id), (SELECT user_version FROM "
            "pragma_user_version), (SELECT json_group_array(name) FROM sqlite_master WHERE type = 'table')"
        ).fetchone()
        tables = set(json.loads(names)) - {"sqlite_sequence"}
        if app != APPLICATION_ID:
            if tables or version:
                raise HistoryError("This is not an nbimagine history index", path=self.index,
                                   cause=f"another program's SQLite file (application_id {app:#x}, "
                                         f"tables: {', '.join(sorted(tables)[:6]) or 'none'})",
                                   fix="Move it away, or run %imagine history --repair, which keeps it "
                                       "in .nbimagine/.broken/ and rebuilds the index from the records")
            return  # an empty file: created by the migration below
        if version > SCHEMA_VERSION:
            raise HistoryError("The history index was written by a newer nbimagine", path=self.index,
                               cause=f"schema version {version}; this version understands up to {SCHEMA_VERSION}",
                               fix="Upgrade nbimagine (pip install -U nbimagine), or use another folder")
        if version == SCHEMA_VERSION:
            for table, needed in _REQUIRED_COLUMNS.items():
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if not needed <= have:
                    missing = ", ".join(sorted(needed - have))
                    raise HistoryError("The history index is damaged", path=self.index,
                                       cause=f"table {table!r} lacks {missing}", fix=FIX_REPAIR)

    def _has_content(self) -> bool:
        """Whether records, image files or job records exist (so an empty index would be a lost one)."""
        with contextlib.suppress(OSError), self.dir.child("jobs") as jobs:
            if any(_JOB_NAME.fullmatch(n) for n in jobs.names()):
                return True
        for top, pattern in (("records", _RECORD_NAME), ("images", _IMAGE_NAME)):
            try:
                folder = self.dir.child(top)
            except OSError:
                continue
            with folder:
                for bucket in folder.names():
                    try:
                        with folder.child(bucket) as sub:
                            if any(pattern.fullmatch(n) for n in sub.names()):
                                return True
                    except (OSError, ValueError):
                        continue
        return False

    def refresh(self) -> None:
        """Reconnect when the index file was replaced (a repair in another kernel) or removed, and
        reopen the folder when ``.nbimagine`` itself was deleted or replaced meanwhile (writing on
        into a deleted folder would lose every image silently)."""
        with self._lock:
            if self.closed or self._depth:
                return
            if not self.dir.still_at(self.root / _DIRNAME):
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self.dir.close()
                target = self.root / _DIRNAME
                try:
                    self.dir = Folder.open(target, create=not target.is_dir())
                except OSError as exc:
                    raise _error(exc, "Cannot open the image history folder", target, folder=self.root) from exc
                self.path = self.dir.path
                self.index = self.path / _INDEX
                self._connect()
                return
            st = self.dir.lstat(_INDEX)
            if st is not None and (st.st_dev, st.st_ino) == self._index_key:
                return
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._connect()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.dir.close()
            self.closed = True

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError("The history is closed", path=self.index,
                               fix="Open it again with nbimagine.history()")
        return self._conn

    # -- transactions and queries --------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, what: str = "Cannot write to the image history") -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            if self.read_only:
                raise HistoryError(what, path=self.index, cause=_read_only_reason(self.path) or "opened read-only",
                                   fix=FIX_ELSEWHERE)
            self.refresh()
            conn = self.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                st = self.dir.lstat(_INDEX)
                if st is None or (st.st_dev, st.st_ino) != self._index_key:
                    # Replaced by a repair while we waited for the lock: write to the new index.
                    conn.execute("ROLLBACK")
                    self.refresh()
                    conn = self.conn
                    conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _error(exc, what, self.index, timeout=self.timeout, folder=self.path) from exc
            self._depth = 1
            try:
                yield conn
                if self._deferred_sync:
                    _sync_all()
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                # Rolled back on purpose (or by an error we report): its records must not be adopted
                # later as if a crash had interrupted them. A crash leaves them, and they are.
                for entry_id in self._written:
                    with contextlib.suppress(OSError), self.dir.descend("records", _bucket(entry_id)) as folder:
                        folder.unlink_file(f"{entry_id}.json")
                if isinstance(exc, (sqlite3.Error, OSError)):
                    raise _error(exc, what, self.index, timeout=self.timeout, folder=self.path) from exc
                raise
            finally:
                self._depth = 0
                self._deferred_sync = False
                self._written = []

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self.conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _error(exc, "Cannot read the image history", self.index, timeout=self.timeout,
                             folder=self.path) from exc

    @property
    def durable(self) -> bool:
        """fsync each file now, unless a batch syncs everything once before it commits."""
        return not (self._depth and self._deferred_sync)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock, self.transaction():
            self._deferred_sync = True
            yield

    # -- notebooks -----------------------------------------------------------------------------

    def notebook_row(self, conn: sqlite3.Connection, name: str, *, create: bool) -> tuple[int, str] | None:
        row = conn.execute("SELECT id, uid FROM notebooks WHERE name = ?", (name,)).fetchone()
        if row is not None or not create:
            return row
        uid = secrets.token_hex(8)
        created = _now()
        cur = conn.execute("INSERT INTO notebooks (uid, name, created_at) VALUES (?, ?, ?)", (uid, name, created))
        self._write_notebook_record(uid, name, created)
        return cur.lastrowid, uid  # type: ignore[return-value]

    def _write_notebook_record(self, uid: str, name: str, created_at: str, merged_into: str | None = None, *,
                               durable: bool | None = None, **fields: Any) -> None:
        """Write ``notebooks/<uid>.json``, keeping what the record already holds (its budget, its spending)
        unless ``fields`` change it. ``durable=False``: no fsync (budget holds: a hold lost in a crash is one
        of a process that is gone; the rename still replaces the record whole)."""
        doc = {**self.notebook_doc(uid), **fields, "notebook": RECORD_VERSION, "uid": uid, "name": name,
               "created_at": created_at, "merged_into": merged_into}
        with self.dir.descend("notebooks", create=True) as folder:
            folder.write(f"{uid}.json", _dumps(doc).encode("ascii"), overwrite=True,
                         durable=self.durable if durable is None else durable and self.durable)

    def notebook_doc(self, uid: str) -> dict[str, Any]:
        """The notebook's record as written (``{}`` when it is missing or not well-formed)."""
        if not _NOTEBOOK_UID.fullmatch(uid):
            return {}
        with contextlib.suppress(OSError, ValueError), self.dir.descend("notebooks") as folder:
            doc = json.loads(folder.read(f"{uid}.json", limit=1 << 20))
            if isinstance(doc, dict) and doc.get("uid") == uid:
                return doc
        return {}

    def update_notebook_record(self, conn: sqlite3.Connection, notebook_id: int, *, durable: bool | None = None,
                               **fields: Any) -> None:
        """Change fields of a notebook's record (inside a transaction: the write lock orders kernels)."""
        uid, name, created = conn.execute("SELECT uid, name, created_at FROM notebooks WHERE id = ?",
                                          (notebook_id,)).fetchone()
        self._write_notebook_record(uid, name, created, durable=durable, **fields)

    def follow(self, kernel_id: str, name: str) -> str | None:
        """Record that ``kernel_id`` now runs notebook ``name``; if it ran another notebook before (a
        rename: the kernel id survives it, and kernel restarts), that notebook's images become
        ``name``'s. Returns the old name when images moved."""
        with self.transaction("Cannot record the notebook's name in the image history") as conn:
            row = conn.execute("SELECT n.id, n.uid, n.name, n.created_at FROM kernels k JOIN notebooks n "
                               "ON n.id = k.notebook_id WHERE k.kernel_id = ?", (kernel_id,)).fetchone()
            moved = row[2] if row is not None and row[2] != name and self.move(conn, row, name) else None
            target = self.notebook_row(conn, name, create=True)
            assert target is not None
            conn.execute("INSERT INTO kernels (kernel_id, notebook_id, seen_at) VALUES (?, ?, ?) "
                         "ON CONFLICT(kernel_id) DO UPDATE SET notebook_id = excluded.notebook_id, "
                         "seen_at = excluded.seen_at", (kernel_id, target[0], _now()))
        return moved

    def move(self, conn: sqlite3.Connection, old: tuple[int, str, str, str], name: str) -> int:
        """Give notebook ``old`` (id, uid, name, created_at) the name ``name``: a rename, or, when ``name``
        exists already, a merge into it. Its notebook record says so, for a repair. Returns how many
        images it had."""
        old_id, old_uid, old_name, created = old
        count = conn.execute("SELECT COUNT(*) FROM entries WHERE notebook_id = ?", (old_id,)).fetchone()[0]
        target = conn.execute("SELECT id, uid FROM notebooks WHERE name = ?", (name,)).fetchone()
        if target is None:
            conn.execute("UPDATE notebooks SET name = ? WHERE id = ?", (name, old_id))
            self._write_notebook_record(old_uid, name, created)
        elif target[0] != old_id:
            conn.execute("UPDATE entries SET notebook_id = ? WHERE notebook_id = ?", (target[0], old_id))
            conn.execute("UPDATE kernels SET notebook_id = ? WHERE notebook_id = ?", (target[0], old_id))
            conn.execute("UPDATE jobs SET notebook_id = ? WHERE notebook_id = ?", (target[0], old_id))
            # What was spent without images goes along; a budget too, unless the target has its own.
            budgets = dict(conn.execute("SELECT id, budget_usd FROM notebooks WHERE id IN (?, ?)", (old_id, target[0])))
            budget = budgets.get(target[0]) if budgets.get(target[0]) is not None else budgets.get(old_id)
            spending = [*_spending_rows(self.notebook_doc(target[1])), *_spending_rows(self.notebook_doc(old_uid))]
            conn.execute("UPDATE notebooks SET budget_usd = ? WHERE id = ?", (budget, target[0]))
            self.update_notebook_record(conn, target[0], budget_usd=budget, spending=spending)
            conn.execute("DELETE FROM notebooks WHERE id = ?", (old_id,))
            self._write_notebook_record(old_uid, old_name, created, merged_into=target[1], spending=[])
        return count

    # -- files -----------------------------------------------------------------------------------

    def sub(self, *names: str, create: bool = False) -> Folder:
        """The folder ``.nbimagine/<names...>``, opened without following links (the caller closes it).

        Opened under the lock: another thread may reopen ``self.dir`` (see :meth:`refresh`); once open,
        the returned folder does not depend on it.
        """
        with self._lock, self.dir.descend(*names[:-1], create=create) as parent:
            return parent.child(names[-1], create=create)

    def image_path(self, sha: str, ext: str) -> Path:
        return self.path / "images" / sha[:2] / f"{sha}.{ext}"

    def read_image(self, sha: str, ext: str, *, entry_id: int | None = None) -> bytes:
        return _read_image(self.sub, sha, ext, entry_id, self.image_path(sha, ext))

    def write_image(self, sha: str, ext: str, data: bytes, *, sync_folder: bool = True) -> bool:
        """Store ``data`` (whose sha256 is ``sha``) unless the same bytes are stored already; True if written."""
        name = f"{sha}.{ext}"
        try:
            with self.dir.descend("images", sha[:2], create=True) as folder:
                st = folder.lstat(name)
                if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data):
                    with contextlib.suppress(OSError):
                        if folder.read(name) == data:  # the bytes hash to the name: no second sha256
                            return False
                # A damaged file, or a link planted under this name: replaced by a rename, never written through.
                folder.write(name, data, overwrite=True, durable=self.durable, sync_folder=sync_folder)
        except OSError as exc:  # named by the folder that failed (images/ read-only...), not by the index
            raise _error(exc, "Cannot store the image files", self.path / "images", folder=self.path) from exc
        return True

    def image_intact(self, sha: str, ext: str, size: int) -> bool:
        """Whether the image file holds exactly the bytes named ``sha`` (read and hashed: rare paths only)."""
        try:
            with self.sub("images", sha[:2]) as folder:
                st = folder.lstat(f"{sha}.{ext}")
                return (st is not None and stat.S_ISREG(st.st_mode) and st.st_size == size
                        and hashlib.sha256(folder.read(f"{sha}.{ext}")).hexdigest() == sha)
        except OSError:
            return False

    def write_entry_files(self, entry_id: int, record: bytes, sha: str, ext: str, data: bytes) -> None:
        """The image (unless stored already) and the record of entry ``entry_id``, durable on return
        (unless in a batch, which syncs once before it commits).

        Each file and its folder are fsync'd (POSIX: a new name is durable once its folder is). The
        record is written on a helper thread while the image is: two fsyncs at the same moment share
        the device's cache flush, so this takes about as long as writing the image alone. Either may
        reach the disk first; an interrupted add's record is adopted only with its whole image
        (see :meth:`next_id`).
        """
        if not self.durable:
            self.write_image(sha, ext, data)
            self.write_record(entry_id, record)
            return
        # The helper thread must not take self._lock (held here by the transaction): write_record does not.
        job = _background(self.write_record, entry_id, record)
        try:
            self.write_image(sha, ext, data)
        finally:
            job.result()  # re-raises the record's error, if any; the row is not committed then

    def thumbnail(self, sha: str, ext: str, side: int, *, entry_id: int | None = None) -> bytes:
        _check_sha_ext(sha, ext, entry_id)
        try:
            thumbs = self.sub("thumbs", create=not self.read_only)
        except OSError:  # not a real folder (a planted link): make it, but do not cache it
            thumbs = None
        try:
            if thumbs is not None:
                for kind in ("jpg", "png"):
                    with contextlib.suppress(OSError):
                        return thumbs.read(f"{sha}_{side}.{kind}")
            data, kind = _render_thumbnail(self.read_image(sha, ext, entry_id=entry_id), side)
            if thumbs is not None and not self.read_only:
                # A cache file: no fsync; the rename still keeps readers from seeing half a file.
                with contextlib.suppress(OSError):
                    thumbs.write(f"{sha}_{side}.{kind}", data, overwrite=True, durable=False)
            return data
        finally:
            if thumbs is not None:
                thumbs.close()

    def write_record(self, entry_id: int, data: bytes, *, sync_folder: bool = True) -> None:
        # Written in place (not via a temp file): it is complete before its row commits, and a record
        # torn by a crash belongs to an add that never returned; next_id() and repair refuse it.
        try:
            with self.dir.descend("records", _bucket(entry_id), create=True) as folder:
                try:
                    folder.write(f"{entry_id}.json", data, atomic=False, durable=self.durable,
                                 sync_folder=sync_folder)
                except FileExistsError:  # a leftover of a rolled-back add: replaced
                    folder.write(f"{entry_id}.json", data, overwrite=True, durable=self.durable,
                                 sync_folder=sync_folder)
        except OSError as exc:
            raise _error(exc, "Cannot write the image records", self.path / "records", folder=self.path) from exc
        if self._depth:
            self._written.append(entry_id)

    def read_record(self, entry_id: int) -> bytes | None:
        try:
            with self.sub("records", _bucket(entry_id)) as folder:
                return folder.read(f"{entry_id}.json", limit=64 << 20)
        except FileNotFoundError:
            return None

    def record_ids(self) -> set[int]:
        ids: set[int] = set()
        try:
            records = self.sub("records")
        except FileNotFoundError:
            return ids
        with records:
            for bucket in records.names():
                try:
                    with records.child(bucket) as folder:
                        ids.update(int(m.group(1)) for m in map(_RECORD_NAME.fullmatch, folder.names()) if m)
                except (OSError, ValueError):
                    continue
        return ids

    # -- batch job records -----------------------------------------------------------------------

    def write_job_record(self, doc: Mapping[str, Any], lines: Sequence[tuple[str, str]] | None = None) -> None:
        """``jobs/<id>.json`` (rewritten when the job changes) and, once, ``jobs/<id>.lines.json``:
        what a repair needs to list the job again and reach it at its provider."""
        with self.dir.descend("jobs", create=True) as folder:
            if lines is not None:
                folder.write(f"{doc['id']}.lines.json", _dumps([list(line) for line in lines]).encode("ascii"),
                             overwrite=True, durable=self.durable)
            folder.write(f"{doc['id']}.json", _dumps({"job": RECORD_VERSION, **doc}).encode("ascii"),
                         overwrite=True, durable=self.durable)

    def job_records(self) -> list[tuple[dict[str, Any], list[tuple[str, str]]]]:
        """Every well-formed job record with its lines (those that are not are left alone)."""
        out = []
        try:
            folder = self.dir.child("jobs")
        except OSError:
            return out
        with folder:
            for name in sorted(folder.names()):
                m = _JOB_NAME.fullmatch(name)
                if not m:
                    continue
                with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                    doc = json.loads(folder.read(name, limit=1 << 20))
                    lines = json.loads(folder.read(f"{m.group(1)}.lines.json", limit=256 << 20))
                    pairs = [(str(custom_id), str(prompt)) for custom_id, prompt in lines]
                    if _job_ok(doc, m.group(1)):
                        out.append((doc, pairs))
        return out

    # -- writing entries -------------------------------------------------------------------------

    def next_id(self, conn: sqlite3.Connection) -> int:
        """The id the next entry gets, after adopting records left by an add that was interrupted
        between writing its record and committing its row (they hold a complete, paid-for image)."""
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        seq = row[0] if row else 0
        if not _is_int(seq) or not 0 <= seq < _MAX_ID:
            raise HistoryError("The history index is damaged", path=self.index,
                               cause=f"its id counter holds {str(seq)[:40]!r}, not a usable id", fix=FIX_REPAIR)
        candidate = seq + 1
        while True:
            data = self.read_record(candidate)
            if data is None:
                return candidate
            record = _parse_record(data, candidate)
            # Its image too must have been written whole (the two files are written at the same time).
            if record is not None and self.image_intact(record["sha256"], record["ext"], record["size_bytes"]) \
                    and not conn.execute("SELECT 1 FROM entries WHERE id = ?", (candidate,)).fetchone():
                self.insert_record(conn, record)
            else:  # not a record we can use: keep it for inspection, never reuse its id
                with contextlib.suppress(OSError), self.dir.descend("records", _bucket(candidate)) as folder:
                    folder.rename(f"{candidate}.json", f"{candidate}.json.refused-{secrets.token_hex(3)}")
                _set_seq(conn, candidate)
            candidate += 1

    def insert_record(self, conn: sqlite3.Connection, record: Mapping[str, Any], *,
                      notebook_ids: dict[str, int] | None = None, edges: bool = True) -> None:
        """Insert a parsed record as a row (its notebook created by name when needed)."""
        name = record["notebook"]
        nb_id = notebook_ids.get(name) if notebook_ids is not None else None
        if nb_id is None:
            uid_row = conn.execute("SELECT id FROM notebooks WHERE uid = ?", (record.get("notebook_uid"),)).fetchone()
            nb_id = uid_row[0] if uid_row else self.notebook_row(conn, name, create=True)[0]  # type: ignore[index]
        revised = record.get("revised_prompt")
        conn.execute(
            "INSERT INTO entries (id, notebook_id, created_at, prompt, revised_prompt, provider, model, params, "
            "parents, sha256, ext, width, height, size_bytes, metadata, text, search, legacy_folder, legacy_id) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (record["id"], nb_id, record["created_at"], record["prompt"], revised, record.get("provider"),
             record.get("model"), _dumps(record["params"]), _dumps(record["parents"]), record["sha256"],
             record["ext"], record.get("width"), record.get("height"), record["size_bytes"],
             _dumps(record["metadata"]), record.get("text"), _search(record["prompt"], revised),
             record.get("legacy_folder"), record.get("legacy_id")),
        )
        if edges and record["parents"]:
            known = _existing(conn, record["parents"])
            conn.executemany("INSERT OR IGNORE INTO edges (child, parent) VALUES (?, ?)",
                             [(record["id"], p) for p in record["parents"] if p in known])

    # -- legacy (nbimagine <= 0.1: one folder per notebook) ----------------------------------------

    def _legacy_folders(self) -> list[str]:
        found = []
        try:
            names = self.dir.names()
        except OSError:
            return []
        for name in names:
            if name.startswith(".") and not name.startswith(_LEGACY_PREFIX):
                continue
            st = self.dir.lstat(name)
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue  # a symlinked folder is never followed
            try:
                with self.dir.child(name) as folder:
                    inner = folder.lstat(_INDEX)
            except OSError:
                continue
            if inner is not None and stat.S_ISREG(inner.st_mode):
                found.append(name)
        return sorted(found)

    def _migrate(self, legacy: list[str]) -> None:
        """Bring the schema to ``SCHEMA_VERSION`` and import per-notebook folders, in one transaction."""
        imported: list[str] = []
        notes: list[str] = []
        with self.transaction("Cannot prepare the image history") as conn:
            self._deferred_sync = True
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # again, under the write lock
            for step in sorted(_MIGRATIONS):
                if step > version:
                    _MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if legacy:
                imported, notes = self._import_legacy(conn, legacy)
        for name in imported:
            with contextlib.suppress(OSError):
                self._retire_legacy(name)
        if notes:
            warnings.warn("nbimagine moved the per-notebook histories into one history for the folder "
                          f"({self.path}): " + "; ".join(notes), RuntimeWarning, stacklevel=2)

    def _read_legacy(self, folder_name: str) -> list[dict[str, Any]]:
        with self.dir.child(folder_name) as folder:
            index = folder.path / _INDEX
            conn = sqlite3.connect(index, timeout=self.timeout, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version != 1:
                    raise sqlite3.DatabaseError(f"schema version {version}, expected 1")
                return [dict(r) for r in conn.execute("SELECT * FROM entries ORDER BY id")]
            finally:
                conn.close()

    def _import_legacy(self, conn: sqlite3.Connection, folders: list[str]) -> tuple[list[str], list[str]]:
        """Import old per-notebook folders; ids are kept where they can be, else recorded as aliases.

        When the store is new, the folder with the most images keeps its ids (its captions stay
        exact); every other image gets a new id above all old ids, and keeps its old one as
        ``legacy_id``, which :meth:`History.resolve` still finds from that notebook. Already imported
        rows (same folder and old id) are skipped, so an interrupted migration can simply run again.
        """
        rows: dict[str, list[dict[str, Any]]] = {}
        notes: list[str] = []
        for folder in folders:
            try:
                rows[folder] = self._read_legacy(folder)
            except (sqlite3.Error, OSError) as exc:
                notes.append(f"{folder!r} could not be read and was left as it is ({exc})")
        done = {(f, i) for f, i in conn.execute(
            "SELECT legacy_folder, legacy_id FROM entries WHERE legacy_folder IS NOT NULL")}
        seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
        seq = seq_row[0] if seq_row else 0
        todo = {f: [r for r in rs if (f, r["id"]) not in done] for f, rs in rows.items()}
        keep = None
        if seq == 0 and any(todo.values()):
            keep = max(todo, key=lambda f: (len(todo[f]), [-ord(c) for c in f]))
        top = max([seq, *(r["id"] for rs in todo.values() for r in rs)], default=0)
        new_ids: dict[tuple[str, int], int] = {(f, i): e for f, i, e in conn.execute(
            "SELECT legacy_folder, legacy_id, id FROM entries WHERE legacy_folder IS NOT NULL")}
        order = [(f, r) for f in sorted(todo) if f == keep for r in todo[f]]
        order += sorted(((f, r) for f in todo if f != keep for r in todo[f]),
                        key=lambda fr: (str(fr[1].get("created_at")), fr[0], fr[1]["id"]))
        for folder, row in order:
            if folder == keep:
                new_ids[(folder, row["id"])] = row["id"]
            else:
                top += 1
                new_ids[(folder, row["id"])] = top
        renumbered: dict[str, int] = {}
        skipped = 0
        inserted: list[tuple[int, list[int]]] = []
        for folder, row in sorted(order, key=lambda fr: new_ids[(fr[0], fr[1]["id"])]):
            new_id = new_ids[(folder, row["id"])]
            name = folder[len(_LEGACY_PREFIX):] if folder.startswith(_LEGACY_PREFIX) else folder
            sha, ext = row.get("sha256"), row.get("ext")
            if not (isinstance(sha, str) and _SHA.fullmatch(sha) and ext in _MEDIA_TYPES):
                skipped += 1
                continue
            with contextlib.suppress(OSError), self.dir.descend(folder, "images", sha[:2]) as source, \
                    self.dir.descend("images", sha[:2], create=True) as target:
                target.link_from(source, f"{sha}.{ext}")
            try:
                parents = [int(p) for p in json.loads(row.get("parents") or "[]")]
                mapped = [new_ids[(folder, p)] for p in parents if (folder, p) in new_ids]
                record = {
                    "id": new_id, "notebook": name, "notebook_uid": None, "created_at": str(row["created_at"]),
                    "prompt": str(row["prompt"]), "revised_prompt": row.get("revised_prompt"),
                    "provider": row.get("provider"), "model": row.get("model"),
                    "params": json.loads(row.get("params") or "{}"), "parents": mapped, "sha256": sha, "ext": ext,
                    "width": row.get("width"), "height": row.get("height"), "size_bytes": int(row["size_bytes"]),
                    "metadata": json.loads(row.get("metadata") or "{}"), "text": row.get("text"),
                    "legacy_folder": folder, "legacy_id": row["id"],
                }
            except (ValueError, TypeError, KeyError):
                skipped += 1
                continue
            self.insert_record(conn, record, edges=False)
            nb_uid = conn.execute("SELECT n.uid FROM notebooks n JOIN entries e ON e.notebook_id = n.id "
                                  "WHERE e.id = ?", (new_id,)).fetchone()[0]
            self.write_record(new_id, _record_from(record, nb_uid))
            inserted.append((new_id, mapped))
            if new_id != row["id"]:
                renumbered[name] = renumbered.get(name, 0) + 1
        conn.executemany("INSERT OR IGNORE INTO edges (child, parent) VALUES (?, ?)",
                         [(child, p) for child, parents in inserted for p in parents])
        if inserted:
            notes.append(f"{len(inserted)} image(s) from {len(todo)} notebook(s) imported")
        for name, count in sorted(renumbered.items()):
            notes.append(f"the {count} image(s) of {name!r} have new ids; their old ids still work there "
                         "(%imagine show #OLD)")
        if skipped:
            notes.append(f"{skipped} malformed row(s) were not imported")
        return list(rows), notes

    def _retire_legacy(self, folder_name: str) -> None:
        """Move an imported per-notebook folder (its old index and files) into ``.v1/``."""
        with self.dir.child(".v1", create=True) as v1:
            target = folder_name[len(_LEGACY_PREFIX):] if folder_name.startswith(_LEGACY_PREFIX) else folder_name
            base, n = target, 1
            while v1.lstat(target) is not None:
                n += 1
                target = f"{base}-{n}"
            if folder_name not in _RESERVED:
                self.dir.rename(folder_name, target, into=v1)
                return
            # A notebook named like one of the store's own folders ("images"): move only its old members.
            with v1.child(target, create=True) as dest, self.dir.child(folder_name) as source:
                for member in _LEGACY_MEMBERS:
                    if source.lstat(member) is not None:
                        source.rename(member, member, into=dest)

    # -- maintenance -------------------------------------------------------------------------------

    def cleanup(self) -> dict[str, int]:
        removed = {"temp_files": 0, "orphan_images": 0, "orphan_thumbnails": 0}
        with self.transaction("Cannot clean up the image history") as conn:  # other kernels wait meanwhile
            rows = conn.execute("SELECT id, sha256, ext FROM entries").fetchall()
            row_ids = {r[0] for r in rows}
            record_ids = self.record_ids()
            if record_ids != row_ids:
                only_records, only_rows = len(record_ids - row_ids), len(row_ids - record_ids)
                raise HistoryError("cleanup() refused: the index and the image records disagree", path=self.index,
                                   cause=f"{only_records} record(s) without a row, {only_rows} row(s) without a "
                                         "record; deleting now could delete images that are still recorded",
                                   fix="Run %imagine history --repair first")
            if not rows and self._has_content():
                raise HistoryError("cleanup() refused: the index lists no image but image files exist",
                                   path=self.index, cause="the index may have been lost or replaced",
                                   fix="Run %imagine history --repair first")
            known = {f"{sha}.{ext}" for _, sha, ext in rows}
            known_sha = {sha for _, sha, _ in rows}
            removed["temp_files"] += self._sweep(self.dir, None)[0]
            with contextlib.suppress(HistoryError), self._repair_lock():  # no repair runs: its leftovers are ours
                for name in self.dir.names():
                    if _REBUILD_NAME.fullmatch(name):
                        removed["temp_files"] += self.dir.unlink_file(name)
            for top, orphan, key, nested in (
                ("images", lambda n: bool(_IMAGE_NAME.fullmatch(n)) and n not in known, "orphan_images", True),
                ("thumbs", lambda n: bool(m := _THUMB_NAME.fullmatch(n)) and m.group(1) not in known_sha,
                 "orphan_thumbnails", False),
                ("records", None, None, True),
                ("notebooks", None, None, False),
                ("jobs", None, None, False),
            ):
                try:
                    folder = self.dir.child(top)
                except OSError:  # absent, or a planted link: nothing of ours to delete there
                    continue
                with folder:
                    subs = []
                    if nested:
                        for name in folder.names():
                            with contextlib.suppress(OSError, ValueError):
                                subs.append(folder.child(name))
                    try:
                        for sub in [folder, *subs]:
                            temps, orphans = self._sweep(sub, orphan if sub is not folder or not nested else None)
                            removed["temp_files"] += temps
                            if key:
                                removed[key] += orphans
                    finally:
                        for sub in subs:
                            sub.close()
        return removed

    @staticmethod
    def _sweep(folder: Folder, orphan: Callable[[str], bool] | None) -> tuple[int, int]:
        """Delete our temp files and the orphans in ``folder`` (regular files only): (temps, orphans)."""
        temps = orphans = 0
        for name in folder.names():
            if _TEMP_NAME.fullmatch(name):
                temps += folder.unlink_file(name)
            elif orphan is not None and orphan(name):
                orphans += folder.unlink_file(name)
        return temps, orphans

    def repair(self) -> RepairReport:
        """Rebuild the index from the records (and from the old index where it is readable)."""
        try:
            return self._repair()
        except (sqlite3.Error, OSError) as exc:  # a full disk, a read-only folder...: typed, with the cause
            raise _error(exc, "Cannot repair the image history", self.index, timeout=self.timeout,
                         folder=self.path) from exc

    def _repair(self) -> RepairReport:
        with self._lock, self._repair_lock():
            if self._depth:
                raise HistoryError("Cannot repair the history inside a batch() or transaction", path=self.index,
                                   fix="Repair outside the with-block")
            report = RepairReport(index=self.index)
            if self._conn is not None and not self.read_only:
                # Other kernels wait while the index is rebuilt; they switch to the new one afterwards.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("BEGIN IMMEDIATE")
            old_rows, old_seq, old_budgets, old_jobs = self._salvage()
            records: dict[int, dict[str, Any]] = {}
            try:
                root_records = self.dir.child("records")
            except FileNotFoundError:
                root_records = None
            except OSError as exc:
                raise _error(exc, "Cannot read the image records", self.path / "records") from exc
            if root_records is not None:
                with root_records:
                    for bucket in sorted(root_records.names()):
                        try:
                            folder = root_records.child(bucket)
                        except (OSError, ValueError):
                            continue
                        with folder:
                            for name in folder.names():
                                m = _RECORD_NAME.fullmatch(name)
                                if not m:
                                    continue
                                entry_id = int(m.group(1))
                                try:
                                    parsed = _parse_record(folder.read(name, limit=64 << 20), entry_id)
                                except OSError:
                                    parsed = None
                                if parsed is None or _bucket(entry_id) != bucket:
                                    report.refused_records.append(f"records/{bucket}/{name}")
                                    # Kept for inspection under another name; the old index may still
                                    # have the row, and then a good record is written in its place.
                                    with contextlib.suppress(OSError):
                                        folder.rename(name, f"{name}.refused-{secrets.token_hex(3)}")
                                    continue
                                records[entry_id] = parsed
            names = self._notebook_names()
            for record in records.values():
                record["notebook"] = names.get(record.get("notebook_uid") or "", record["notebook"])
            report.from_records = len(records)
            for entry_id, row in old_rows.items():
                if entry_id not in records:
                    records[entry_id] = row
                    report.from_old_index += 1
            # Budgets and spending without images live in the notebook records (an older index may hold a
            # budget its record lacks): a notebook that has them comes back even without images.
            docs = self._notebook_records()
            budgets = {**old_budgets, **{uid: _budget_value(doc["budget_usd"]) for uid, doc in docs.items()
                                          if "budget_usd" in doc and not doc.get("merged_into")}}
            kept = {uid: doc["name"] for uid, doc in docs.items() if not doc.get("merged_into")
                    and (budgets.get(uid) is not None or _spending_rows(doc))}
            jobs = self.job_records()
            recorded = {doc["id"] for doc, _ in jobs}
            # Jobs whose record cannot be read (lost, or a link planted in jobs/) but the old index still has.
            unrecorded = [job for job in old_jobs if job[0]["id"] not in recorded]
            jobs += unrecorded
            for doc, _ in jobs:
                doc["notebook"]["name"] = names.get(doc["notebook"].get("uid") or "", doc["notebook"]["name"])
            report.old_index = self._rebuild(records, max([old_seq, *records], default=0), report, kept, budgets,
                                             jobs)
            for doc, lines in unrecorded:  # recorded again, so that the next repair finds them
                with contextlib.suppress(OSError):
                    self.write_job_record(doc, lines)
        return report

    @contextlib.contextmanager
    def _repair_lock(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the SQLite write lock below still applies
            yield
            return
        try:
            fd = self.dir.open_fd(".repair.lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise _error(exc, "Cannot repair the image history", self.path / ".repair.lock") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HistoryError("Another repair of this history is running", path=self.index,
                                   fix="Wait for it to finish") from None
            yield
        finally:
            os.close(fd)

    def _salvage(self) -> tuple[dict[int, dict[str, Any]], int, dict[str, float],
                                list[tuple[dict[str, Any], list[tuple[str, str]]]]]:
        """Rows of the current index that can still be read (those without a record are kept), its id
        sequence, the notebooks' budgets (by uid: an index written before budgets had records), and its
        batch jobs (for those whose record cannot be read)."""
        rows: dict[int, dict[str, Any]] = {}
        seq = 0
        budgets: dict[str, float] = {}
        jobs: list[tuple[dict[str, Any], list[tuple[str, str]]]] = []
        try:
            conn = self._conn or sqlite3.connect(f"file:{self.index}?mode=ro", uri=True, timeout=1)
        except sqlite3.Error:
            return rows, seq, budgets, jobs
        try:
            with contextlib.suppress(sqlite3.Error):
                for (job,) in conn.execute("SELECT id FROM jobs").fetchall():
                    try:
                        doc = History._job_doc(conn, job)
                        lines = [(str(c), str(p)) for c, p in conn.execute(
                            "SELECT custom_id, prompt FROM job_lines WHERE job = ? ORDER BY position", (job,))]
                    except (TypeError, ValueError, RecursionError, sqlite3.Error):
                        continue
                    if _job_ok(doc, job):
                        jobs.append((doc, lines))
            with contextlib.suppress(sqlite3.Error):
                found = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
                seq = found[0] if found and _is_int(found[0]) and 0 <= found[0] < _MAX_ID else 0
            with contextlib.suppress(sqlite3.Error):
                budgets = {uid: usd for uid, usd in conn.execute(
                    "SELECT uid, budget_usd FROM notebooks WHERE budget_usd IS NOT NULL")
                    if isinstance(uid, str) and _budget_value(usd) is not None}
            with contextlib.suppress(sqlite3.Error):
                for r in conn.execute(
                        "SELECT e.id, n.uid, n.name, e.created_at, e.prompt, e.revised_prompt, e.provider, e.model, "
                        "e.params, e.parents, e.sha256, e.ext, e.width, e.height, e.size_bytes, e.metadata, e.text, "
                        "e.legacy_folder, e.legacy_id FROM entries e JOIN notebooks n ON n.id = e.notebook_id"):
                    (entry_id, uid, name, created, prompt, revised, provider, model, params, parents, sha, ext,
                     width, height, size, metadata, text, legacy_folder, legacy_id) = r
                    try:
                        record = {"id": entry_id, "notebook_uid": uid, "notebook": name, "created_at": created,
                                  "prompt": prompt, "revised_prompt": revised, "provider": provider, "model": model,
                                  "params": _json(params, dict), "parents": _json(parents, list), "sha256": sha,
                                  "ext": ext, "width": width, "height": height, "size_bytes": size,
                                  "metadata": _json(metadata, dict), "text": text, "legacy_folder": legacy_folder,
                                  "legacy_id": legacy_id}
                        doc = _dumps({"record": 1, **record, "notebook": {"uid": uid, "name": name}}).encode()
                    except (TypeError, ValueError, OverflowError):  # a value no record could hold (bytes...)
                        continue
                    if _parse_record(doc, entry_id) is not None:
                        rows[entry_id] = record
        finally:
            if conn is not self._conn:
                conn.close()
        return rows, seq, budgets, jobs

    def _notebook_names(self) -> dict[str, str]:
        """uid -> current name, from the notebook records (following merges)."""
        docs = self._notebook_records()
        names = {}
        for uid in docs:
            seen, current = set(), uid
            while isinstance(docs[current].get("merged_into"), str) and docs[current]["merged_into"] in docs \
                    and current not in seen:
                seen.add(current)
                current = docs[current]["merged_into"]
            names[uid] = docs[current]["name"]
        return names

    def _notebook_records(self) -> dict[str, dict[str, Any]]:
        """uid -> the well-formed notebook records."""
        docs: dict[str, dict[str, Any]] = {}
        try:
            folder = self.dir.child("notebooks")
        except OSError:
            return {}
        with folder:
            for name in folder.names():
                m = re.fullmatch(r"([0-9a-f]{16})\.json", name)
                if not m:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    doc = json.loads(folder.read(name, limit=1 << 20))
                    if isinstance(doc, dict) and doc.get("uid") == m.group(1) and isinstance(doc.get("name"), str):
                        docs[m.group(1)] = doc
        return docs

    def _rebuild(self, records: dict[int, dict[str, Any]], seq: int, report: RepairReport,
                 notebooks: Mapping[str, str], budgets: Mapping[str, float | None],
                 jobs: Sequence[tuple[dict[str, Any], list[tuple[str, str]]]] = ()) -> Path | None:
        tmp = f"{_INDEX}.rebuild-{secrets.token_hex(4)}"
        tmp_path = self.path / tmp
        conn = sqlite3.connect(tmp_path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=MEMORY")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN")
            for step in sorted(_MIGRATIONS):
                _MIGRATIONS[step](conn)
            uids: dict[str, str] = {}
            for record in records.values():
                uids.setdefault(record["notebook"], record.get("notebook_uid") or secrets.token_hex(8))
            for doc, _ in jobs:
                uids.setdefault(doc["notebook"]["name"], doc["notebook"].get("uid") or secrets.token_hex(8))
            for uid, name in notebooks.items():
                uids.setdefault(name, uid)
            notebook_ids = {}
            for name, uid in sorted(uids.items()):
                cur = conn.execute("INSERT INTO notebooks (uid, name, created_at, budget_usd) VALUES (?, ?, ?, ?)",
                                   (uid, name, _now(), budgets.get(uid)))
                notebook_ids[name] = cur.lastrowid
            for entry_id in sorted(records):
                self.insert_record(conn, records[entry_id], notebook_ids=notebook_ids, edges=False)
            conn.executemany("INSERT OR IGNORE INTO edges (child, parent) VALUES (?, ?)",
                             [(i, p) for i, r in records.items() for p in r["parents"] if p in records])
            report.jobs = _insert_jobs(conn, jobs, records, notebook_ids)
            if seq:
                _set_seq(conn, seq)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode=DELETE")
        except BaseException:
            conn.close()
            with contextlib.suppress(OSError):
                self.dir.unlink_file(tmp)
            raise
        conn.close()
        # Records for rows that only the old index had, and notebook records for every notebook.
        for entry_id, record in records.items():
            if self.read_record(entry_id) is None:
                self.write_record(entry_id, _record_from(record, uids[record["notebook"]]))
        existing = self._notebook_names()
        for name, uid in uids.items():
            doc = self.notebook_doc(uid)
            if existing.get(uid) != name or doc.get("budget_usd") != budgets.get(uid):
                self._write_notebook_record(uid, name, doc.get("created_at") or _now(), budget_usd=budgets.get(uid))
        _sync_all()
        for entry_id, record in records.items():
            st = None
            with contextlib.suppress(OSError), self.dir.descend("images", record["sha256"][:2]) as folder:
                st = folder.lstat(f"{record['sha256']}.{record['ext']}")
            if st is None or not stat.S_ISREG(st.st_mode):
                report.missing_images.append(entry_id)
        report.missing_images.sort()
        report.entries, report.notebooks = len(records), len(uids)
        # Swap: the old index (and its WAL, which must never be replayed onto the new file) goes to .broken/.
        try:
            broken = self.dir.child(".broken", create=True)
        except OSError as exc:  # a file or a planted link there: nothing is moved anywhere
            with contextlib.suppress(OSError):
                self.dir.unlink_file(tmp)
            raise _error(exc, "Cannot repair the image history", self.path / ".broken") from exc
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        kept = None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(2)}"
        with broken:
            for name in _INDEX_FILES:
                st = self.dir.lstat(name)
                if st is None:
                    continue
                moved = f"index-{stamp}.sqlite{name[len(_INDEX):]}"
                self.dir.rename(name, moved, into=broken)
                if name == _INDEX:
                    kept = broken.path / moved
        self.dir.rename(tmp, _INDEX)
        self.dir.sync()
        self._connect()
        return kept


def _spending_rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The well-formed rows of a notebook record's ``spending`` (others are left out)."""
    rows = []
    for row in doc.get("spending") or ():
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("day", "provider", "model")):
            continue
        figures = {k: row.get(k, 0.0) for k in ("usd", "simulated_usd", "charged_usd")}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in figures.values()):
            continue
        requests = row.get("requests", 0)
        rows.append({"day": row["day"], "provider": row["provider"], "model": row["model"], **figures,
                     "requests": requests if isinstance(requests, int) and not isinstance(requests, bool) else 0})
    return rows


def _budget_value(value: Any) -> float | None:
    """A budget as kept in a record or row: a finite amount >= 0, else none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


_HOLD_LIFETIME = 24 * 3600.0  # a hold older than this is a leftover (no request waits a day for its answer)


def _live_holds(doc: Mapping[str, Any], pending: Callable[[str], float | None]) -> dict[str, dict[str, Any]]:
    """The holds of a notebook record still in force, each with ``held``: what it holds now.

    A batch job's hold (``job``) holds its share of the lines not yet collected (``pending(job)``: their
    fraction, None while the job is not in the index yet), however long the job takes. Others end with
    their process on this machine (a kernel that crashed mid-request), and after a day."""
    holds: dict[str, dict[str, Any]] = {}
    found = doc.get("holds")
    host = socket.gethostname()
    now = datetime.now(timezone.utc)
    for token, hold in (found.items() if isinstance(found, dict) else ()):
        try:
            usd, pid, at = float(hold["usd"]), int(hold["pid"]), datetime.fromisoformat(hold["at"])
            if not math.isfinite(usd) or usd < 0:
                continue
            left = pending(hold["job"]) if isinstance(hold.get("job"), str) else None
        except (KeyError, TypeError, ValueError):
            continue
        if left is not None:
            if left > 0:
                holds[str(token)] = {**hold, "usd": usd, "held": usd * left, "held_by_job": True}
            continue
        if (now - at).total_seconds() > _HOLD_LIFETIME or (hold.get("host") == host and not _alive(pid)):
            continue
        holds[str(token)] = {**hold, "usd": usd, "held": usd}
    return holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's process, or no way to tell: keep its hold
    return True


def _job_ok(doc: Any, job: str) -> bool:
    """Whether ``doc`` is a well-formed job record (or row) of job ``job``."""
    fields = ("provider", "kind", "state", "created_at", "updated_at")
    return (isinstance(doc, dict) and doc.get("id") == job and isinstance(doc.get("notebook"), dict)
            and isinstance(doc["notebook"].get("name"), str)
            and all(isinstance(doc.get(k), str) for k in fields)
            and all(isinstance(doc.get(k), t) for k, t in (("params", dict), ("parents", list), ("connection", dict))))


def _record_from(record: Mapping[str, Any], notebook_uid: str) -> bytes:
    return _record(
        record["id"], notebook_uid=notebook_uid, notebook=record["notebook"], created_at=record["created_at"],
        prompt=record["prompt"], revised_prompt=record.get("revised_prompt"), provider=record.get("provider"),
        model=record.get("model"), params=_dumps(record["params"]), parents=record["parents"],
        sha256=record["sha256"], ext=record["ext"], width=record.get("width"), height=record.get("height"),
        size_bytes=record["size_bytes"], metadata=_dumps(record["metadata"]), text=record.get("text"),
        legacy_folder=record.get("legacy_folder"), legacy_id=record.get("legacy_id"),
    )


def _insert_jobs(conn: sqlite3.Connection, jobs: Sequence[tuple[dict[str, Any], list[tuple[str, str]]]],
                 records: Mapping[int, Mapping[str, Any]], notebook_ids: Mapping[str, int]) -> int:
    """Jobs from their records; a line is collected when images carry its job and ``custom_id``."""
    collected: dict[tuple[str, str], list[int]] = {}
    for entry_id, record in sorted(records.items()):
        meta = record["metadata"]
        if isinstance(meta.get("batch_job"), str) and isinstance(meta.get("custom_id"), str):
            collected.setdefault((meta["batch_job"], meta["custom_id"]), []).append(entry_id)
    count = 0
    for doc, lines in jobs:
        nb_id = notebook_ids.get(doc["notebook"]["name"])
        if nb_id is None:
            continue
        with contextlib.suppress(sqlite3.IntegrityError):  # a provider id twice: the first record wins
            conn.execute(
                "INSERT INTO jobs (id, notebook_id, job_id, provider, kind, model, params, parents, connection, state, "
                "created_at, updated_at, collected_at, total) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (doc["id"], nb_id, _str_or_none(doc.get("job_id")), doc["provider"], doc["kind"],
                 _str_or_none(doc.get("model")), _dumps(doc["params"]), _dumps(doc["parents"]),
                 _dumps(doc["connection"]), doc["state"], doc["created_at"], doc["updated_at"],
                 _str_or_none(doc.get("collected_at")), len(lines)))
            conn.executemany(
                "INSERT OR IGNORE INTO job_lines (job, custom_id, position, prompt, outcome, entries) "
                "VALUES (?,?,?,?,?,?)",
                [(doc["id"], custom_id, i, prompt, "done" if (doc["id"], custom_id) in collected else None,
                  json.dumps(collected.get((doc["id"], custom_id), [])))
                 for i, (custom_id, prompt) in enumerate(lines)])
            count += 1
    return count


def _search(prompt: str, revised: str | None) -> str:
    return "\x1f".join(s.casefold() for s in (prompt, revised or ""))


def _existing(conn: sqlite3.Connection, ids: Sequence[int]) -> set[int]:
    if not ids:
        return set()
    return {r[0] for r in conn.execute(f"SELECT id FROM entries WHERE id IN ({','.join('?' * len(ids))})",
                                       tuple(ids))}


def _set_seq(conn: sqlite3.Connection, value: int) -> None:
    """Never hand out ids up to ``value`` (sqlite_sequence has no unique key: update, else insert)."""
    if not conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'entries'", (value,)).rowcount:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('entries', ?)", (value,))


_WORKER: Any = None


def _background(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the history's helper thread; returns its ``Future``."""
    global _WORKER
    if _WORKER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbimagine-history")
    return _WORKER.submit(fn, *args)


def _sync_all() -> None:
    """Flush every written file at once (batches, migration, repair: one flush instead of one per file)."""
    if hasattr(os, "sync"):
        os.sync()


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL: readers and one writer work at once, and NORMAL sync stays crash-safe.

    When two kernels open a brand-new history at the same moment, SQLite answers the mode switch
    with "database is locked" at once, without calling the busy handler, so wait and retry here.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# History: the view of one notebook (or of all of them)
# --------------------------------------------------------------------------------------------


class History:
    """The image history of one notebook, in the folder-wide store ``<root>/.nbimagine/``.

    ``notebook`` defaults to the running notebook (see :mod:`nbimagine._notebook`);
    ``all_notebooks=True`` gives a read-only view of every notebook of the folder. Positions
    (``h[0]`` oldest, ``h[-1]`` newest), ``len``, iteration, :meth:`latest`, :meth:`page` and
    :meth:`search` see this notebook only; :meth:`get`, ``in`` and :meth:`lineage` take ids, which are
    unique in the folder. Safe to share between threads, and between kernels writing at once.

    Raises :class:`~nbimagine.errors.HistoryError` when the store cannot be opened (damaged,
    foreign, newer, locked...), with the fix in the message.
    """

    def __init__(self, root: str | os.PathLike[str] = ".", notebook: str | None = None, *,
                 all_notebooks: bool = False, timeout: float | None = None, _store: _Store | None = None) -> None:
        self.identity: NotebookIdentity | None = None
        if all_notebooks:
            name = None
        elif notebook:
            if not isinstance(notebook, str):
                raise TypeError(f"notebook must be a str, not {type(notebook).__name__}")
            name = normalize_name(notebook)
            if not name:
                raise ValueError(f"{notebook!r} is not a notebook name")
        else:
            self.identity = _notebook.current()
            name = self.identity.name
        self._owned = _store is None
        self._store = _store or _Store(Path(root).expanduser().resolve(), timeout=timeout)
        self.notebook = name
        self.root = self._store.root
        self.path = self._store.path
        self.closed = False
        if self.identity is not None and self._owned:
            _follow(self._store, self.identity)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owned:
            self._store.close()
        self.closed = True

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        """True when the folder cannot be written (the history can still be read)."""
        return self._store.read_only

    @contextlib.contextmanager
    def batch(self) -> Iterator[History]:
        """Group many :meth:`add` calls into one transaction (much faster for bulk imports).

        Other writers wait until the block ends; on an exception nothing in the block is recorded
        (image files already written stay, unreferenced, until :meth:`cleanup`).
        """
        with self._store.batch():
            yield self

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
        """Record ``image`` in this notebook and return its entry.

        ``provider`` and ``model`` default to the image's metadata. ``parents`` are the ids (or
        entries, or ``"#17"``) of the images this one was made from; they must exist in the folder
        (``KeyError`` otherwise). ``HistoryError`` when the store cannot be written.
        """
        if not isinstance(image, BinaryResult):
            raise TypeError(f"History.add() takes a BinaryResult, not {type(image).__name__}")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
        if self.notebook is None:
            raise ValueError("this view shows every notebook; add to one: nbimagine.history(NAME).add(...)")
        parent_ids = tuple(dict.fromkeys(_parse_ref(p) for p in parents))  # dedupe, keep order
        data = image.data
        sha = image.sha256
        media_type = sniff_media_type(data) or "application/octet-stream"
        ext = EXTENSIONS.get(media_type, "bin")
        meta = _scrub(dict(image.metadata))
        meta["media_type"] = media_type
        provider = _text(provider if provider is not None else _str_or_none(meta.get("provider")))
        model = _text(model if model is not None else _str_or_none(meta.get("model")))
        revised = _text(meta.get("revised_prompt")) if isinstance(meta.get("revised_prompt"), str) else None
        width, height = meta.get("width"), meta.get("height")
        width = width if isinstance(width, int) and not isinstance(width, bool) else None
        height = height if isinstance(height, int) and not isinstance(height, bool) else None
        created = datetime.now(timezone.utc)
        prompt, text = _text(prompt), _text(text)
        params_json = _dumps(_scrub(params or {}))
        meta_json = _dumps(meta)
        store = self._store
        with store.transaction() as conn:
            known = _existing(conn, parent_ids)
            missing = [p for p in parent_ids if p not in known]
            if missing:
                refs = ", ".join(f"#{m}" for m in missing)
                raise KeyError(f"parent image {refs} is not in the image history of {self.path}")
            nb_id, nb_uid = store.notebook_row(conn, self.notebook, create=True)  # type: ignore[misc]
            entry_id = store.next_id(conn)
            # Under the write lock: another kernel's cleanup() would otherwise take the file of this
            # not-yet-inserted row for an orphan. Image and record are complete and durable before the
            # row commits: a lost index is rebuilt from the records.
            store.write_entry_files(entry_id, _record(
                entry_id, notebook_uid=nb_uid, notebook=self.notebook, created_at=created.isoformat(),
                prompt=prompt, revised_prompt=revised, provider=provider, model=model, params=params_json,
                parents=parent_ids, sha256=sha, ext=ext, width=width, height=height, size_bytes=len(data),
                metadata=meta_json, text=text), sha, ext, data)
            conn.execute(
                "INSERT INTO entries (id, notebook_id, created_at, prompt, revised_prompt, provider, model, params, "
                "parents, sha256, ext, width, height, size_bytes, metadata, text, search) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (entry_id, nb_id, created.isoformat(), prompt, revised, provider, model, params_json,
                 json.dumps(parent_ids), sha, ext, width, height, len(data), meta_json, text,
                 _search(prompt, revised)),
            )
            if parent_ids:
                conn.executemany("INSERT INTO edges (child, parent) VALUES (?, ?)",
                                 [(entry_id, p) for p in parent_ids])
        return HistoryEntry(
            id=entry_id, prompt=prompt, provider=provider, model=model,
            params=FrozenDict(json.loads(params_json)), parents=parent_ids, created_at=created, sha256=sha,
            media_type=media_type, width=width, height=height, size_bytes=len(data),
            path=store.image_path(sha, ext), metadata=FrozenDict(meta), text=text, notebook=self.notebook,
            _store=store,
        )

    def merge(self, notebook: str) -> int:
        """Move every image of notebook ``notebook`` into this one; returns how many moved.

        For images that ended up under another name: made while the notebook could not be told
        (``untitled-…``), or before a rename done outside Jupyter (the file browser, a shell), which
        nothing can follow. ``KeyError`` when the folder has no such notebook.
        """
        if self.notebook is None:
            raise ValueError("this view shows every notebook; merge into one: nbimagine.history(NAME).merge(...)")
        name = normalize_name(notebook)
        with self._store.transaction("Cannot merge the notebooks' images") as conn:
            row = conn.execute("SELECT id, uid, name, created_at FROM notebooks WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyError(f"no notebook {name!r} in the image history of {self.path}")
            if name == self.notebook:
                return 0
            return self._store.move(conn, row, self.notebook)

    def cleanup(self) -> dict[str, int]:
        """Remove leftovers of interrupted writes: temp files, image files and thumbnails no row refers to.

        Deletes only regular files with the names the history gives its own files, never through a
        link, and nothing at all while the index and the records disagree or the index lists no
        image but files exist (``HistoryError``: repair first). Never run automatically. Returns
        what was removed.
        """
        return self._store.cleanup()

    def repair(self) -> RepairReport:
        """Rebuild the index of this folder from the image records (``%imagine history --repair``).

        For a lost, truncated, corrupt or foreign index: ids, prompts, parameters, notebooks (with
        their renames) and lineage come back from ``records/``; rows of the old index that had no
        record are kept where it is still readable. The old index is moved to ``.broken/``. Other
        kernels switch to the new index on their next use.
        """
        return self._store.repair()

    # -- reading ---------------------------------------------------------------------------------

    def _entry(self, row: tuple[Any, ...]) -> HistoryEntry:
        (id_, created, prompt, provider, model, params, parents, sha, ext, width, height, size, metadata, text,
         notebook) = row
        _check_sha_ext(sha, ext, id_)
        try:
            params, parents, metadata = _json(params, dict), _json(parents, list), _json(metadata, dict)
            if not (isinstance(prompt, str) and isinstance(created, str) and _is_int(size)
                    and all(v is None or isinstance(v, str) for v in (provider, model, text, notebook))
                    and all(v is None or _is_int(v) for v in (width, height))
                    and all(_is_int(p) and 0 < p <= _MAX_ID for p in parents)):
                raise TypeError("a column holds a value of the wrong type")
            entry = HistoryEntry(
                id=id_, prompt=prompt, provider=provider, model=model, params=FrozenDict(params),
                parents=tuple(parents), created_at=datetime.fromisoformat(created),
                sha256=sha, media_type=_MEDIA_TYPES[ext], width=width, height=height, size_bytes=size,
                path=self._store.image_path(sha, ext), metadata=FrozenDict(metadata), text=text,
                notebook=notebook, _store=self._store,
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise HistoryError(f"History row #{id_} is malformed and was refused", path=self._store.index,
                               cause=str(exc)[:200], fix=FIX_REPAIR) from exc
        return entry

    def _entries(self, rows: Sequence[tuple[Any, ...]], *, strict: bool) -> list[HistoryEntry]:
        """Rows as entries. ``strict`` (one image asked for by id or position): a malformed row raises
        ``HistoryError``. Otherwise (listings) it is left out with one warning, so one bad row does not
        hide every other image."""
        if strict:
            return [self._entry(r) for r in rows]
        entries, refused = [], []
        for row in rows:
            try:
                entries.append(self._entry(row))
            except HistoryError:
                refused.append(row[0])
        if refused:
            ids = ", ".join(f"#{i}" for i in refused[:10]) + ("…" if len(refused) > 10 else "")
            warnings.warn(f"History row(s) {ids} of {self._store.index} are malformed and were left out; "
                          f"{FIX_REPAIR}", RuntimeWarning, stacklevel=3)
        return entries

    def _where(self, where: str = "", args: Sequence[Any] = ()) -> tuple[str, tuple[Any, ...]]:
        clauses, values = [], []
        if self.notebook is not None:
            clauses.append(_IN_NOTEBOOK)
            values.append(self.notebook)
        if where:
            clauses.append(where)
            values.extend(args)
        return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), tuple(values)

    def _rows(self, where: str = "", args: Sequence[Any] = (), order: str = "e.id DESC",
              limit: int = -1, offset: int = 0, *, everywhere: bool = False) -> list[tuple[Any, ...]]:
        clause, values = (f"WHERE {where}", tuple(args)) if everywhere else self._where(where, args)
        sql = f"SELECT {_COLUMNS} {_FROM} {clause} ORDER BY {order} LIMIT ? OFFSET ?"
        # SQLite integers are 64-bit: a user's #99999999999999999999 or `history 1e30` is "no such image" /
        # "all of them", not an OverflowError. No id or position reaches the clamped values.
        return self._store.query(sql, tuple(_int64(v) for v in (*values, limit, offset)))

    def _select(self, where: str = "", args: Sequence[Any] = (), order: str = "e.id DESC",
                limit: int = -1, offset: int = 0, *, everywhere: bool = False, strict: bool = False
                ) -> list[HistoryEntry]:
        return self._entries(self._rows(where, args, order, limit, offset, everywhere=everywhere), strict=strict)

    def __len__(self) -> int:
        clause, values = self._where()
        return self._store.query(f"SELECT COUNT(*) FROM entries e {clause}", values)[0][0]

    def __bool__(self) -> bool:
        clause, values = self._where()
        return bool(self._store.query(f"SELECT EXISTS (SELECT 1 FROM entries e {clause})", values)[0][0])

    def __getitem__(self, index: int | slice) -> HistoryEntry | list[HistoryEntry]:
        """By position in this notebook, oldest first: ``h[0]`` is the first image, ``h[-1]`` the newest."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._select(order="e.id ASC", limit=max(stop - start, 0), offset=start)
            positions = range(start, stop, step)
            if not positions:
                return []
            lo, hi = min(positions), max(positions)
            chunk = self._select(order="e.id ASC", limit=hi - lo + 1, offset=lo)
            return [chunk[p - lo] for p in positions if p - lo < len(chunk)]
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"history indices must be ints or slices, not {type(index).__name__} "
                            f"(use .get({index!r}) to look up by id)")
        # Negative positions count from the newest, without a COUNT(*) first.
        rows = (self._select(order="e.id DESC", limit=1, offset=-index - 1, strict=True) if index < 0
                else self._select(order="e.id ASC", limit=1, offset=index, strict=True))
        if not rows:
            raise IndexError(f"history position {index} out of range ({len(self)} images in {self._name()})")
        return rows[0]

    def __iter__(self) -> Iterator[HistoryEntry]:
        """Oldest first, read in chunks (entries added while iterating are included)."""
        last = 0
        while True:
            chunk = self._rows("e.id > ?", (last,), order="e.id ASC", limit=500)
            yield from self._entries(chunk, strict=False)
            if len(chunk) < 500:
                return
            last = chunk[-1][0]

    def __contains__(self, item: object) -> bool:
        """Whether an image with this id exists in the folder's history (ids are unique there)."""
        try:
            ref = _parse_ref(item)  # type: ignore[arg-type]
        except TypeError:
            return False
        return bool(self._store.query("SELECT 1 FROM entries WHERE id = ?", (ref,)))

    def get(self, id: int | str) -> HistoryEntry:
        """The image with this id (``17`` or ``"#17"``), from whichever notebook of the folder made it.

        ``KeyError`` if there is none.
        """
        ref = _parse_ref(id)
        rows = self._select("e.id = ?", (ref,), everywhere=True, strict=True)
        if not rows:
            raise KeyError(f"no image #{ref} in the image history of {self.path} ({self._known_ids()})")
        return rows[0]

    def resolve(self, ref: int | str | HistoryEntry) -> HistoryEntry:
        """The entry a user means by ``ref``: ``"last"``, ``-2`` / ``"-2"`` (positions in this notebook),
        or an id ``17`` / ``"#17"``.

        An id is looked up in the whole folder, except that an id this notebook had before the
        history became one per folder (see the migration) still means that notebook's image.
        ``KeyError`` / ``IndexError`` with a message that says what exists.
        """
        if isinstance(ref, HistoryEntry):
            return ref
        if isinstance(ref, str):
            text = ref.strip()
            if text == "last":
                return self[-1]  # type: ignore[return-value]
            if re.fullmatch(r"-\d+", text):
                return self[int(text)]  # type: ignore[return-value]
        if isinstance(ref, int) and not isinstance(ref, bool) and ref < 0:
            return self[ref]  # type: ignore[return-value]
        wanted = _parse_ref(ref)
        rows = self._select("e.id = ?", (wanted,), everywhere=True, strict=True)
        if rows and (self.notebook is None or rows[0].notebook == self.notebook):
            return rows[0]
        if self.notebook is not None:
            alias = self._select("e.legacy_id = ?", (wanted,), order="e.id ASC", limit=1, strict=True)
            if alias:
                return alias[0]
        if rows:
            return rows[0]
        raise KeyError(f"no image #{wanted} in the image history of {self.path} ({self._known_ids()})")

    def _known_ids(self) -> str:
        clause, values = self._where()
        count, lo, hi = self._store.query(f"SELECT COUNT(*), MIN(e.id), MAX(e.id) FROM entries e {clause}",
                                          values)[0]
        if count:
            return f"{self._name()} has {count} image(s), ids {lo}..{hi}"
        return f"{self._name()} has no images"

    def _name(self) -> str:
        return f"notebook {self.notebook!r}" if self.notebook is not None else "the folder"

    # -- cost and budget ---------------------------------------------------------------------------

    def cost(self) -> CostReport:
        """What this notebook spent (every notebook's, for ``all_notebooks=True``), by local day, provider and
        model: see :class:`~nbimagine._cost.CostReport`. An OpenAI Responses image is listed under its chat model
        and its image model (``gpt-4.1 + gpt-image-1``): both are billed. Requests whose images are not in the
        history (``--no-history``, text-only answers, Python API calls) come from the notebook's record."""
        from ._cost import CostReport, CostRow

        clause, values = self._where("coalesce(e.provider, '') != 'nbimagine'")
        found: dict[tuple[str, str, str], CostRow] = {}
        for day, provider, model, images, usd, simulated, unpriced, charged in self._store.query(
                _COST_SQL.format(where=clause), values):
            found[(day, provider, model)] = CostRow(day, provider, model, images, usd or 0.0, simulated or 0.0,
                                                    unpriced, charged_usd=charged or 0.0)
        held = held_jobs = 0.0
        for doc in self._notebook_docs():
            for hold in _live_holds(doc, self._job_pending).values():
                held += hold["held"]
                held_jobs += hold["held"] if hold.get("held_by_job") else 0.0
            for row in _spending_rows(doc):
                key = (row["day"], row["provider"], row["model"])
                base = found.get(key) or CostRow(*key, images=0, usd=0.0)
                found[key] = dataclasses.replace(
                    base, usd=base.usd + row["usd"], simulated_usd=base.simulated_usd + row["simulated_usd"],
                    charged_usd=base.charged_usd + row["charged_usd"], unrecorded_usd=base.unrecorded_usd + row["usd"])
        return CostReport(self.notebook or "(all notebooks)", tuple(found[k] for k in sorted(found)),
                          budget_usd=self.budget_usd, held_usd=held, held_jobs_usd=held_jobs)

    def _notebook_docs(self) -> list[dict[str, Any]]:
        """The records of this notebook (of every notebook, for the folder's view)."""
        if self.notebook is None:
            uids = [r[0] for r in self._store.query("SELECT uid FROM notebooks")]
        else:
            uids = [r[0] for r in self._store.query("SELECT uid FROM notebooks WHERE name = ?", (self.notebook,))]
        return [self._store.notebook_doc(uid) for uid in uids]

    @property
    def budget_usd(self) -> float | None:
        """The notebook's spending budget in US dollars (``%imagine budget``), None when there is none. Kept in
        the notebook's record (and its index row), so it survives restarts, follows renames and comes back
        with a repair."""
        if self.notebook is None:
            return None
        rows = self._store.query("SELECT budget_usd FROM notebooks WHERE name = ?", (self.notebook,))
        return rows[0][0] if rows else None

    def set_budget(self, usd: float | None) -> None:
        """Set (None: lift) the notebook's budget; it is checked before each request. ``ConfigError`` for an
        amount that is not one (negative, NaN, text that is not a number: see ``_budget.budget_amount``)."""
        from ._budget import budget_amount

        usd = budget_amount(usd)
        self._one_notebook("A budget belongs to one notebook")
        with self._store.transaction("Cannot keep the notebook's budget in the image history") as conn:
            notebook_id = self._store.notebook_row(conn, self.notebook, create=True)[0]  # type: ignore[index,arg-type]
            conn.execute("UPDATE notebooks SET budget_usd = ? WHERE id = ?", (usd, notebook_id))
            self._store.update_notebook_record(conn, notebook_id, budget_usd=usd)

    def _one_notebook(self, what: str) -> None:
        if self.notebook is None:
            raise HistoryError(what, path=self._store.index,
                               cause="this is the view of every notebook (all_notebooks=True)",
                               fix="open the notebook's history: nbimagine.history() or history(notebook=...)")

    def add_spending(self, provider: str, model: str, usd: float, *, simulated: bool = False,
                     charged: bool = False) -> None:
        """Count spending that left no image in this history (``--no-history``, a text-only answer, a Python
        API call) in the notebook's record, by local day, provider and model. ``charged``: the cost is unknown
        and ``usd`` is the request's estimated high end, counted against the budget only."""
        self._one_notebook("Spending belongs to one notebook")
        day = date.today().isoformat()
        with self._store.transaction("Cannot record the notebook's spending in the image history") as conn:
            notebook_id, uid = self._store.notebook_row(conn, self.notebook, create=True)  # type: ignore[misc,arg-type]
            rows = _spending_rows(self._store.notebook_doc(uid))
            row = next((r for r in rows if (r["day"], r["provider"], r["model"]) == (day, provider, model)), None)
            if row is None:
                row = {"day": day, "provider": provider, "model": model, "usd": 0.0, "simulated_usd": 0.0,
                       "charged_usd": 0.0, "requests": 0}
                rows.append(row)
            row["requests"] += 1
            row["charged_usd" if charged else "usd"] += usd
            if simulated and not charged:
                row["simulated_usd"] += usd
            self._store.update_notebook_record(conn, notebook_id, spending=rows)

    def hold_budget(self, usd: float, check: Callable[[CostReport], None], *, job: str | None = None) -> str | None:
        """Hold ``usd`` of the notebook's budget for requests about to be sent, after ``check(report)`` (which
        raises to refuse) saw what is spent and held, all under the history's write lock: kernels that share
        the notebook see each other's holds and cannot both pass a budget. ``job``: the hold of a batch job
        of that id (see :meth:`add_job`), given back line by line as its lines are collected, in any kernel.
        Returns the hold's token (None on a read-only history, where nothing can be held)."""
        self._one_notebook("A budget belongs to one notebook")
        if self.read_only:
            check(self.cost())
            return None
        token = secrets.token_hex(8)
        with self._store.transaction("Cannot hold the notebook's budget in the image history") as conn:
            notebook_id, uid = self._store.notebook_row(conn, self.notebook, create=True)  # type: ignore[misc,arg-type]
            check(self.cost())
            holds = self._holds_of(uid)
            holds[token] = {"usd": usd, "pid": os.getpid(), "host": socket.gethostname(), "at": _now(),
                            **({"job": job} if job is not None else {})}
            self._store.update_notebook_record(conn, notebook_id, holds=holds, durable=False)
        return token

    def release_budget(self, token: str, usd: float | None = None) -> None:
        """Give back ``usd`` of a hold (all of it by default) once its requests have ended and their spending is
        recorded."""
        with self._store.transaction("Cannot release the notebook's budget in the image history") as conn:
            for notebook_id, uid in conn.execute("SELECT id, uid FROM notebooks WHERE name = ?", (self.notebook,)):
                holds = self._holds_of(uid)
                if token not in holds:
                    continue
                left = holds[token]["usd"] - (holds[token]["usd"] if usd is None else usd)
                if left > 1e-12:
                    holds[token]["usd"] = left
                else:
                    del holds[token]
                self._store.update_notebook_record(conn, notebook_id, holds=holds, durable=False)

    def _holds_of(self, uid: str) -> dict[str, dict[str, Any]]:
        """The notebook's holds still in force, as they are written back (spent ones are dropped)."""
        return {token: {k: v for k, v in hold.items() if k not in ("held", "held_by_job")}
                for token, hold in _live_holds(self._store.notebook_doc(uid), self._job_pending).items()}

    def _job_pending(self, id: str) -> float | None:
        """The fraction of batch job ``id``'s lines not collected yet (0 when it was never submitted); None
        when the history has no such job (yet)."""
        rows = self._store.query("SELECT j.state, j.total, (SELECT count(*) FROM job_lines l WHERE l.job = j.id "
                                 "AND l.outcome IS NULL) FROM jobs j WHERE j.id = ?", (id,))
        if not rows:
            return None
        state, total, pending = rows[0]
        # A collected job has none left (a repair brings back lines that failed as pending).
        return 0.0 if state in ("submit_failed", "collected") or not total else pending / total

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
        return self._select("instr(e.search, ?) > 0", (needle,), limit=-1 if limit is None else limit)

    def lineage(self, id: int | str | HistoryEntry) -> list[HistoryEntry]:
        """Every ancestor of entry ``id`` and the entry itself, oldest first.

        With several parents the chains are merged without duplicates. Parents always exist before
        their children (``add`` checks), so id order is a valid topological order.
        """
        ref = _parse_ref(id)
        self.get(ref)  # a clear KeyError for an unknown id
        rows = self._store.query(
            f"""WITH RECURSIVE anc(id) AS (
                    SELECT ? UNION SELECT parent FROM edges JOIN anc ON edges.child = anc.id)
                SELECT {_COLUMNS} {_FROM} WHERE e.id IN (SELECT id FROM anc) ORDER BY e.id ASC""",
            (ref,),
        )
        return self._entries(rows, strict=False)

    def children(self, id: int | str | HistoryEntry) -> list[HistoryEntry]:
        """The entries made directly from entry ``id``, oldest first."""
        ref = _parse_ref(id)
        return self._select("e.id IN (SELECT child FROM edges WHERE parent = ?)", (ref,), order="e.id ASC",
                            everywhere=True)

    def notebooks(self) -> dict[str, int]:
        """Every notebook of the folder that has images, with how many: ``{"cafe": 6, ...}``."""
        rows = self._store.query("SELECT n.name, COUNT(e.id) FROM notebooks n JOIN entries e ON e.notebook_id = n.id "
                                 "GROUP BY n.id ORDER BY n.name")
        return dict(rows)  # type: ignore[arg-type]

    # -- export ------------------------------------------------------------------------------------

    def export(self, directory: str | os.PathLike[str], entries: Sequence[HistoryEntry] | None = None, *,
               overwrite: bool = False) -> list[Path]:
        """Copy full-resolution images to ``directory`` as ``<id>-<slug>.<ext>``, plus ``history.json``.

        ``entries`` defaults to this notebook's whole history. Nothing existing is replaced: a name
        that is taken gets ``-2``, ``-3``... (a file already holding the same bytes is reused), unless
        ``overwrite=True`` replaces it. Links in ``directory`` are never written through. Returns the
        image paths, then the manifest's.
        """
        chosen = list(self) if entries is None else list(entries)
        try:
            target = Folder.open(directory, create=True)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise _error(exc, "Cannot export the images", directory, fix=_FIX_EXPORT) from exc
        written: list[Path] = []
        manifest = []
        with target:
            try:
                for e in chosen:
                    name = f"{e.id}-{_slug(e.prompt)}.{e.ext}"
                    data = e.image.data
                    name = target.write(name, data, overwrite=True) if overwrite else target.write_unique(name, data)
                    written.append(target.path / name)
                    manifest.append({
                        "id": e.id, "file": name, "notebook": e.notebook, "prompt": e.prompt,
                        "revised_prompt": e.revised_prompt, "provider": e.provider, "model": e.model,
                        "params": dict(e.params), "parents": list(e.parents),
                        "created_at": e.created_at.isoformat(), "sha256": e.sha256, "media_type": e.media_type,
                        "width": e.width, "height": e.height, "size_bytes": e.size_bytes, "text": e.text,
                        "metadata": dict(e.metadata),
                    })
                doc = {"notebook": self.notebook, "exported_at": _now(), "schema_version": SCHEMA_VERSION,
                       "entries": manifest}
                data = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass")
                name = (target.write("history.json", data, overwrite=True) if overwrite
                        else target.write_unique("history.json", data))
            except OSError as exc:
                raise _error(exc, "Cannot export the images", target.path, fix=_FIX_EXPORT) from exc
            written.append(target.path / name)
        return written

    # -- batch jobs ------------------------------------------------------------------------------

    def add_job(self, id: str, *, provider: str, kind: str, model: str | None, params: Mapping[str, Any],
                parents: Sequence[int], connection: Mapping[str, Any], lines: Sequence[tuple[str, str]]) -> None:
        """Record a batch job of this notebook before it is submitted (state ``submitting``): ``lines``
        are its ``(custom_id, prompt)`` pairs, in order. ``connection`` must hold no secret."""
        if self.notebook is None:
            raise ValueError("this view shows every notebook; add to one: nbimagine.history(NAME)")
        if not re.fullmatch(r"[0-9a-f]{12}", id):
            raise ValueError(f"a job id is 12 hex digits, not {id!r}")
        now = _now()
        with self._store.transaction() as conn:
            nb_id, _ = self._store.notebook_row(conn, self.notebook, create=True)  # type: ignore[misc]
            conn.execute(
                "INSERT INTO jobs (id, notebook_id, job_id, provider, kind, model, params, parents, connection, state, "
                "created_at, updated_at, collected_at, total) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (id, nb_id, None, provider, kind, model, _dumps(_scrub(dict(params))), json.dumps(list(parents)),
                 _dumps(_scrub(dict(connection))), "submitting", now, now, None, len(lines)))
            conn.executemany("INSERT INTO job_lines (job, custom_id, position, prompt) VALUES (?,?,?,?)",
                             [(id, custom_id, i, _text(prompt)) for i, (custom_id, prompt) in enumerate(lines)])
            # Before the rows commit, as for images: a lost index is rebuilt from the records.
            self._store.write_job_record(self._job_doc(conn, id), [(c, _text(p) or "") for c, p in lines])

    def update_job(self, id: str, *, state: str, job_id: str | None = None) -> None:
        """Set a job's last known state (and its provider id, once known)."""
        now = _now()
        with self._store.transaction() as conn:
            row = conn.execute("SELECT state, job_id FROM jobs WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise KeyError(f"no batch job {id!r} in the history")
            if row == (state, job_id or row[1]):
                return  # polled again, nothing new: no write
            conn.execute("UPDATE jobs SET state = ?, updated_at = ?, job_id = COALESCE(?, job_id), "
                         "collected_at = COALESCE(?, collected_at) WHERE id = ?",
                         (state, now, job_id, now if state == "collected" else None, id))
            self._store.write_job_record(self._job_doc(conn, id))

    @staticmethod
    def _job_doc(conn: sqlite3.Connection, id: str) -> dict[str, Any]:
        (job_id, provider, kind, model, params, parents, connection, state, created, updated, collected, uid,
         name) = conn.execute(
            "SELECT j.job_id, j.provider, j.kind, j.model, j.params, j.parents, j.connection, j.state, j.created_at, "
            "j.updated_at, j.collected_at, n.uid, n.name FROM jobs j JOIN notebooks n ON n.id = j.notebook_id "
            "WHERE j.id = ?", (id,)).fetchone()
        return {"id": id, "notebook": {"uid": uid, "name": name}, "job_id": job_id, "provider": provider,
                "kind": kind, "model": model, "params": json.loads(params), "parents": json.loads(parents),
                "connection": json.loads(connection), "state": state, "created_at": created, "updated_at": updated,
                "collected_at": collected}

    def jobs(self) -> list[JobRecord]:
        """The batch jobs of this notebook (of every notebook for an ``all_notebooks`` view), newest first."""
        where, args = ("WHERE n.name = ?", (self.notebook,)) if self.notebook is not None else ("", ())
        return [self._job(row) for row in self._store.query(
            f"SELECT {_JOB_COLUMNS} {_JOB_FROM} {where} ORDER BY j.created_at DESC, j.rowid DESC", args)]

    def job(self, ref: str) -> JobRecord:
        """A job by nbimagine id or provider id (a unique prefix of either will do), or ``last`` (this
        notebook's newest); ``KeyError`` when none or several match. Ids are unique in the folder."""
        ref = ref.strip()
        if ref in ("last", "-1"):
            jobs = self.jobs()[:1]
        else:
            rows = self._store.query(f"SELECT {_JOB_COLUMNS} {_JOB_FROM} WHERE j.id = ? OR j.job_id = ?", (ref, ref))
            if not rows and ref:
                pattern = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                rows = self._store.query(f"SELECT {_JOB_COLUMNS} {_JOB_FROM} WHERE j.id LIKE ? ESCAPE '\\' "
                                         "OR j.job_id LIKE ? ESCAPE '\\'", (pattern, pattern))
            jobs = [self._job(row) for row in rows]
        if len(jobs) != 1:
            known = ", ".join(j.job_id or j.id for j in self.jobs()[:5]) or "none"
            what = "no batch job" if not jobs else f"{len(jobs)} batch jobs"
            raise KeyError(f"{what} matching {ref!r} in the history of notebook {self.notebook!r} "
                           f"(recent: {known}); %imagine jobs lists them")
        return jobs[0]

    def job_lines(self, id: str) -> list[JobLine]:
        """The lines of job ``id`` in submission order, with their outcome so far."""
        rows = self._store.query("SELECT custom_id, position, prompt, outcome, entries, error FROM job_lines "
                                 "WHERE job = ? ORDER BY position", (id,))
        return [JobLine(c, p, pr, o, tuple(int(i) for i in json.loads(e)), err) for c, p, pr, o, e, err in rows]

    def collect_line(self, job: JobRecord, custom_id: str, images: Sequence[BinaryResult], *,
                     text: str | None = None, error: str | None = None) -> tuple[list[HistoryEntry], bool]:
        """Record the result of one line of ``job`` exactly once; returns its entries and whether they
        are new. A line already collected (by this kernel, or another) keeps its first entries.

        The images go to the job's notebook, with the job's parameters and parents, in the same
        transaction that marks the line: a crash leaves the line either collected or not.
        """
        target = self if self.notebook == job.notebook else History(notebook=job.notebook, _store=self._store)
        with self._store.transaction() as conn:
            row = conn.execute("SELECT outcome, entries, prompt FROM job_lines WHERE job = ? AND custom_id = ?",
                               (job.id, custom_id)).fetchone()
            if row is None:
                raise KeyError(f"batch job {job.job_id or job.id} has no line {custom_id!r}")
            outcome, ids, prompt = row
            if outcome is not None:
                return [self.get(i) for i in json.loads(ids)], False
            known = _existing(conn, job.parents)
            entries = [target.add(image, prompt=prompt, provider=job.provider,
                                  model=image.metadata.get("model") or job.model, params=job.params,
                                  parents=[p for p in job.parents if p in known], text=text)
                       for image in images]
            conn.execute("UPDATE job_lines SET outcome = ?, entries = ?, error = ? WHERE job = ? AND custom_id = ?",
                         ("failed" if error is not None and not entries else "done",
                          json.dumps([e.id for e in entries]), _text(error), job.id, custom_id))
        return entries, True

    def _job(self, row: tuple[Any, ...]) -> JobRecord:
        (id_, job_id, provider, kind, model, params, parents, connection, state, created, updated, collected,
         total, notebook) = row
        counts = dict(self._store.query("SELECT COALESCE(outcome, 'pending'), COUNT(*) FROM job_lines WHERE job = ? "
                                        "GROUP BY outcome", (id_,)))
        try:
            return JobRecord(
                id=id_, job_id=job_id, provider=provider, kind=kind, model=model,
                params=FrozenDict(json.loads(params)), parents=tuple(int(p) for p in json.loads(parents)),
                connection=FrozenDict(json.loads(connection)), state=state,
                created_at=datetime.fromisoformat(created), updated_at=datetime.fromisoformat(updated),
                collected_at=datetime.fromisoformat(collected) if collected else None, total=total,
                done=counts.get("done", 0), failed=counts.get("failed", 0), notebook=notebook)
        except (TypeError, ValueError) as exc:
            raise HistoryError(f"History row of batch job {id_} is malformed and was refused",
                               path=self._store.index, cause=str(exc), fix=FIX_REPAIR) from exc

    def __repr__(self) -> str:
        return f"History({self.notebook!r}, {len(self)} images, {str(self.path)!r})"


@dataclass(frozen=True)
class JobRecord:
    """A batch job as the history knows it; ``state`` is the last one seen (``collected`` once its
    results are in the history); ``done`` / ``failed`` count the lines collected so far."""

    id: str
    job_id: str | None
    provider: str
    kind: str
    model: str | None
    params: dict[str, Any]
    parents: tuple[int, ...]
    connection: dict[str, Any]
    state: str
    created_at: datetime
    updated_at: datetime
    collected_at: datetime | None
    total: int
    done: int
    failed: int
    notebook: str | None = None

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True)
class JobLine:
    """One request line of a batch job: its ``custom_id``, prompt and outcome (``None`` until collected)."""

    custom_id: str
    position: int
    prompt: str
    outcome: str | None
    entries: tuple[int, ...]
    error: str | None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------
# The current notebook's history
# --------------------------------------------------------------------------------------------

_stores: dict[Path, _Store] = {}
_views: dict[tuple[Path, str | None], History] = {}
_followed: dict[tuple[Path, str], str] = {}
_cache_lock = threading.RLock()
_root: Path | None = None


def set_history_root(root: str | os.PathLike[str] | None) -> None:
    """Keep the history of this kernel under ``root`` instead of the working directory (``None``: back to it).

    ``%imagine history --root DIR`` does this, e.g. when the notebook's folder is read-only.
    """
    global _root
    _root = Path(root).expanduser().resolve() if root is not None else None


def _follow(store: _Store, identity: NotebookIdentity) -> None:
    """When the Jupyter server names this kernel's notebook, keep the store's notebook in step (a
    rename moves the images along). Done once per name change; a read-only store is left as it is."""
    if identity.source != "server" or not identity.kernel_id:
        return
    key = (store.root, identity.kernel_id)
    if _followed.get(key) == identity.name:
        return
    if not store.read_only:
        try:
            moved = store.follow(identity.kernel_id, identity.name)
        except HistoryError as exc:
            warnings.warn(f"nbimagine could not follow the notebook's name: {exc}", RuntimeWarning, stacklevel=3)
            return
        if moved:
            warnings.warn(f"The notebook was renamed: the images of {moved!r} now belong to {identity.name!r}",
                          RuntimeWarning, stacklevel=3)
    _followed[key] = identity.name


def repair_history(root: str | os.PathLike[str] | None = None) -> RepairReport:
    """Rebuild the image history index of ``root`` (default: as :func:`history`) from its records.

    What ``%imagine history --repair`` runs; works when the index cannot even be opened (lost,
    truncated, corrupt, foreign). See :meth:`History.repair`.
    """
    base = Path(root).expanduser().resolve() if root is not None else (_root or Path(os.getcwd()).resolve())
    with _cache_lock:
        store = _stores.get(base)
        if store is not None and not store.closed:
            return store.repair()
        store = _Store(base, connect=False)
        try:
            return store.repair()
        finally:
            store.close()


def history(notebook: str | None = None, root: str | os.PathLike[str] | None = None, *,
            all_notebooks: bool = False) -> History:
    """The history of the current notebook (or of ``notebook``; ``all_notebooks=True``: every notebook),
    in ``root`` (default: the folder set with :func:`set_history_root`, else the working directory).

    Jupyter starts a kernel in its notebook's folder, so the default puts ``.nbimagine/`` next to the
    notebook. The running notebook is asked for on every call (cheaply: see
    :mod:`nbimagine._notebook`), so a rename is followed. Views and the store are cached and reused;
    a store that failed to open is not, so the next call tries again.
    """
    base = Path(root).expanduser().resolve() if root is not None else (_root or Path(os.getcwd()).resolve())
    with _cache_lock:
        store = _stores.get(base)
        if store is None or store.closed:
            store = _stores[base] = _Store(base)
        else:
            store.refresh()
        identity = None
        if all_notebooks:
            name = None
        elif notebook:
            name = normalize_name(notebook)
        else:
            identity = _notebook.current()
            name = identity.name
            _follow(store, identity)
        view = _views.get((base, name))
        if view is None or view.closed or view._store is not store:
            view = History(base, name, all_notebooks=name is None, _store=store)
            _views[(base, name)] = view
        view.identity = identity
        return view


def _forget_all() -> None:
    """Close and forget every cached store and view, the followed names and the root (tests, reloads)."""
    global _root
    with _cache_lock:
        for store in _stores.values():
            with contextlib.suppress(Exception):
                store.close()
        _stores.clear()
        _views.clear()
        _followed.clear()
        _root = None
