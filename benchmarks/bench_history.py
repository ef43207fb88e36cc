"""Benchmark of the image history (``nbimagine._history``): one store per folder, many notebooks.

Run ``python benchmarks/bench_history.py``; ``benchmarks/run.py`` calls :func:`main`.

How the stores are built: through the public ``History.add``, inside ``History.batch()``
transactions (only the build is batched), each entry with its own record file and row; images are
small 16x16 PNGs (2,000 distinct ones cycled in the big store: content addressing stores each once,
as it does for real duplicates). Every measured ``add`` below is a normal, separately committed one.

Measured (median of several runs, wall clock), each beside a baseline measured in the same run:
- ``open_first_page``: 100,000 entries over 20 notebooks: ``History(root, nb)`` (new SQLite
  connection, pragmas, schema check, legacy scan) + ``len`` + ``page(0, 24)`` of one notebook.
  Baseline: a bare ``sqlite3.connect`` + the same two queries. Target 50 ms.
- ``lookup_id``: ``get(N)`` / ``resolve("#N")`` on that store. Baseline: the bare SELECT. Target 5 ms.
- ``add_no_image_write``: ``add`` of an image whose file already exists: hashing, metadata, its
  record (written and fsync'd), one committed INSERT. Target 10 ms.
- ``add_with_image_write``: ``add`` of a new 1024x1024 PNG (~1.5 MB): the above plus the image's
  temp-file write, fsync and rename. Target 10 ms plus the time to write the same bytes alone.
- ``gallery_page_cached``: ``page(0, 24)`` + the 24 thumbnails, already cached, from a 1,000-entry
  history opened fresh. Target 200 ms.
- ``repair_10k``: ``repair_history`` of a 10,000-image store whose index was deleted (read every
  record, rebuild, swap). Baseline: reading and parsing the 10,000 records alone. Target 20 s.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from nbimagine._files import Folder
    from nbimagine._history import History, _forget_all, history, repair_history
    from nbimagine.events import BinaryResult
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nbimagine._files import Folder
    from nbimagine._history import History, _forget_all, history, repair_history
    from nbimagine.events import BinaryResult

NOTEBOOKS = 20
BIG = 100_000
REPAIR = 10_000


def _png(i: int, size: tuple[int, int] = (16, 16)) -> bytes:
    from PIL import Image

    im = Image.new("RGB", size, (i % 256, (i >> 8) % 256, (i >> 16) % 256))
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _big_png(i: int) -> bytes:
    # Roughly the size of a real 1024x1024 generation (~1.5 MB): random noise does not compress.
    from PIL import Image

    im = Image.frombytes("RGB", (1024, 512), os.urandom(1024 * 512 * 3)).resize((1024, 1024))
    im.putpixel((0, 0), (i % 256, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


_META = {"provider": "emulator", "model": "bench-image-1", "revised_prompt": "a revised prompt"}


def _build(root: Path, total: int, notebooks: int, distinct: int) -> float:
    """``total`` entries spread round-robin over ``notebooks`` notebooks; seconds taken."""
    images = [BinaryResult(_png(i), _META) for i in range(distinct)]
    # history() shares one store (one connection) between the notebooks' views, as in a kernel.
    views = [history(f"notebook-{n:02d}", root=root) for n in range(notebooks)]
    t0 = time.perf_counter()
    prev: dict[int, int | None] = {}
    chunk = 2_000
    for start in range(0, total, chunk):
        with views[0].batch():  # one store: the batch covers every view
            for i in range(start, min(start + chunk, total)):
                n = i % notebooks
                parent = prev.get(n)
                e = views[n].add(images[i % distinct], prompt=f"bench image {i}: an axolotl in a teacup",
                                 params={"size": "1024x1024", "quality": "low"}, parents=[parent] if parent else ())
                prev[n] = e.id if i % 10 else None  # short edit chains, like real sessions
    took = time.perf_counter() - t0
    _forget_all()
    return took


def _median_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(root: str | os.PathLike[str] | None = None, entries: int = BIG,
         repair_entries: int = REPAIR) -> dict[str, Any]:
    """Run the benchmark, print one line per measure, and return the numbers (ms; repair in s)."""
    tmp = Path(tempfile.mkdtemp(prefix="nbimagine-bench-", dir=root))
    results: dict[str, tuple[float, float | None, float | None, str]] = {}
    try:
        big = tmp / "big"
        build_s = _build(big, entries, NOTEBOOKS, 2_000)
        print(f"built {entries} entries over {NOTEBOOKS} notebooks in {build_s:.1f} s "
              f"({build_s / entries * 1e6:.0f} us per add inside batches)")
        name = "notebook-07"
        index = big / ".nbimagine" / "index.sqlite"

        def open_first_page() -> None:
            h = History(big, name)
            assert len(h) == entries // NOTEBOOKS and len(h.page(0, 24)) == 24
            h.close()

        def bare_open_first_page() -> None:
            conn = sqlite3.connect(index)
            nb = conn.execute("SELECT id FROM notebooks WHERE name = ?", (name,)).fetchone()[0]
            conn.execute("SELECT COUNT(*) FROM entries WHERE notebook_id = ?", (nb,)).fetchone()
            assert len(conn.execute("SELECT * FROM entries WHERE notebook_id = ? ORDER BY id DESC LIMIT 24",
                                    (nb,)).fetchall()) == 24
            conn.close()

        results["open_first_page"] = (_median_ms(open_first_page, 21), 50.0,
                                      _median_ms(bare_open_first_page, 21), "bare sqlite3 connect + 2 queries")

        h = History(big, name)
        ids = [e.id for e in h.page(0, 500)] + [e.id for e in h.page(150, 24)]
        rng = random.Random(7)
        picks = [rng.choice(ids) for _ in range(301)]
        it = iter(picks)
        lookup = _median_ms(lambda: h.resolve(f"#{next(it)}"), 301)
        conn = sqlite3.connect(index)
        it2 = iter(picks)
        bare = _median_ms(lambda: conn.execute("SELECT * FROM entries WHERE id = ?", (next(it2),)).fetchone(), 301)
        conn.close()
        results["lookup_id"] = (lookup, 5.0, bare, "bare SELECT by id")

        dup = BinaryResult(_png(1), {"provider": "emulator", "model": "bench-image-1"})
        results["add_no_image_write"] = (
            _median_ms(lambda: h.add(dup, prompt="again", params={"size": "1024x1024"}), 31), 10.0, None, "")

        bigs = iter([_big_png(i) for i in range(12)])
        write_only = iter([_big_png(100 + i) for i in range(12)])
        scratch = tmp / "scratch"
        with Folder.open(scratch) as folder:
            write_ms = _median_ms(lambda: folder.write(f"{time.perf_counter_ns()}.png", next(write_only)), 11)
        add_ms = _median_ms(lambda: h.add(BinaryResult(next(bigs)), prompt="a new big image"), 11)
        results["add_with_image_write"] = (add_ms, 10.0 + write_ms, write_ms, "the same bytes written alone")
        h.close()

        gallery = tmp / "gallery"
        _build(gallery, 1000, 1, 1000)
        with History(gallery, "notebook-00") as g:
            for e in g.page(0, 24):
                e.thumbnail()  # warm the on-disk cache, as the gallery's first visit would
        g = History(gallery, "notebook-00")

        def first_page() -> None:
            thumbs = [e.thumbnail() for e in g.page(0, 24)]
            assert len(thumbs) == 24

        results["gallery_page_cached"] = (_median_ms(first_page, 21), 200.0, None, "")
        g.close()

        lost = tmp / "lost"
        _build(lost, repair_entries, 4, repair_entries)
        for extra in ("", "-wal", "-shm"):
            (lost / ".nbimagine" / f"index.sqlite{extra}").unlink(missing_ok=True)
        t0 = time.perf_counter()
        records = 0
        for path in (lost / ".nbimagine" / "records").rglob("*.json"):
            json.loads(path.read_bytes())
            records += 1
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = repair_history(lost)
        repair_s = time.perf_counter() - t0
        assert report.entries == records == repair_entries, report
        results["repair_10k"] = (repair_s * 1000, 20_000.0, read_s * 1000, "reading + parsing the records alone")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out: dict[str, Any] = {"build_seconds": round(build_s, 2), "entries": entries}
    for key, (value, target, baseline, what) in results.items():
        unit, scale = ("s", 1000.0) if key == "repair_10k" else ("ms", 1.0)
        line = f"{key}: {value / scale:.2f} {unit}"
        if baseline is not None:
            line += f" (baseline, {what}: {baseline / scale:.2f} {unit}, ratio {value / baseline:.2f}x)"
        if target is not None:
            line += f" target {target / scale:.1f} {unit} {'OK' if value <= target else 'OVER'}"
        print(line)
        out[key] = {"ms": round(value, 3), "target_ms": target, "baseline_ms": None if baseline is None else
                    round(baseline, 3), "ok": None if target is None else value <= target}
    return out


if __name__ == "__main__":
    main()
