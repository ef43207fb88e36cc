"""Benchmark of the per-notebook image history (``nbimagine._history``).

Run ``python benchmarks/bench_history.py``; ``benchmarks/run.py`` calls :func:`main`.

How the histories are built: 10,000 (and 1,000) entries are added through the public
``History.add`` inside one ``History.batch()`` transaction, each with its own small distinct PNG
(16x16, made with Pillow), so every entry has its own image file, as in real use. Only the build is
batched; every measured ``add`` below is a normal, separately committed one.

Measured (median of several runs, wall clock):
- ``open_latest50``: ``History(root, nb)`` (new SQLite connection, pragmas) + ``latest(50)`` on 10,000 entries.
- ``add_no_image_write``: ``add`` of an image whose file already exists (content addressing skips the
  write): hashing, metadata, one committed INSERT.
- ``add_with_image_write``: ``add`` of a new 1024x1024 PNG: the above plus the temp-file write, fsync
  and rename. Its target is 10 ms plus the time to write the same bytes alone (measured here too).
- ``gallery_page_cached``: ``page(0, 24)`` + the 24 thumbnails, already cached on disk, from a
  1,000-entry history opened fresh.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from nbimagine._history import History, _atomic_write
    from nbimagine.events import BinaryResult
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nbimagine._history import History, _atomic_write
    from nbimagine.events import BinaryResult


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


def _build(root: Path, name: str, n: int) -> tuple[History, float]:
    h = History(root, name)
    meta = {"provider": "emulator", "model": "bench-image-1", "revised_prompt": "a revised prompt"}
    t0 = time.perf_counter()
    with h.batch():
        prev = None
        for i in range(n):
            e = h.add(BinaryResult(_png(i), meta), prompt=f"bench image {i}: an axolotl in a teacup",
                      params={"size": "1024x1024", "quality": "low"}, parents=[prev] if prev else ())
            prev = e.id if i % 10 else None  # short edit chains, like real sessions
    return h, time.perf_counter() - t0


def _median_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _line(name: str, value: float, target: float) -> str:
    return f"{name}: {value:.2f} ms (target {target:.1f} ms) {'OK' if value <= target else 'OVER'}"


def main(root: str | os.PathLike[str] | None = None, entries: int = 10_000) -> dict[str, Any]:
    """Run the benchmark, print one line per measure, and return the numbers (all in ms)."""
    tmp = Path(tempfile.mkdtemp(prefix="nbimagine-bench-", dir=root))
    results: dict[str, Any] = {}
    try:
        big, build_s = _build(tmp, "big", entries)
        print(f"built {entries} entries in {build_s:.1f} s (one batch transaction, one 16x16 PNG file each)")
        big.close()

        def open_latest() -> None:
            h = History(tmp, "big")
            assert len(h.latest(50)) == 50
            h.close()

        results["open_latest50"] = (_median_ms(open_latest, 21), 50.0)

        h = History(tmp, "big")
        dup = BinaryResult(_png(1), {"provider": "emulator", "model": "bench-image-1"})
        results["add_no_image_write"] = (
            _median_ms(lambda: h.add(dup, prompt="again", params={"size": "1024x1024"}), 31), 10.0)

        bigs = iter([_big_png(i) for i in range(12)])
        write_only = iter([_big_png(100 + i) for i in range(12)])
        scratch = tmp / "scratch"
        scratch.mkdir()
        write_ms = _median_ms(lambda: _atomic_write(scratch / f"{time.perf_counter_ns()}.png", next(write_only)),
                              11)
        add_ms = _median_ms(lambda: h.add(BinaryResult(next(bigs)), prompt="a new big image"), 11)
        results["image_write_alone"] = (write_ms, None)
        results["add_with_image_write"] = (add_ms, 10.0 + write_ms)
        h.close()

        gallery, _ = _build(tmp, "gallery", 1000)
        for e in gallery.page(0, 24):
            e.thumbnail()  # warm the on-disk cache, as the gallery's first visit would
        gallery.close()
        g = History(tmp, "gallery")

        def first_page() -> None:
            thumbs = [e.thumbnail() for e in g.page(0, 24)]
            assert len(thumbs) == 24

        results["gallery_page_cached"] = (_median_ms(first_page, 21), 200.0)
        g.close()
        g = History(tmp, "gallery")

        t0 = time.perf_counter()
        assert len([e.thumbnail() for e in g.page(1, 24)]) == 24
        results["gallery_page_uncached"] = ((time.perf_counter() - t0) * 1000, None)
        g.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out: dict[str, Any] = {"build_seconds": round(build_s, 2), "entries": entries}
    for name, (value, target) in results.items():
        if target is None:
            print(f"{name}: {value:.2f} ms (informational)")
        else:
            print(_line(name, value, target))
        out[name] = {"ms": round(value, 3), "target_ms": None if target is None else round(target, 3),
                     "ok": None if target is None else value <= target}
    return out


if __name__ == "__main__":
    main()
