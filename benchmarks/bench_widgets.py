"""Benchmark of the studio gallery: kernel-side time to show the first page of a 1,000-image history.

Run ``python benchmarks/bench_widgets.py``; ``benchmarks/run.py`` calls :func:`main`.

How the history is built: 1,000 entries added through the public ``History.add`` inside one
``History.batch()`` transaction, each with its own distinct 320x320 picture (a noisy gradient, so that
its 192 px JPEG thumbnail has a realistic size of several KB, not the few hundred bytes of a flat
colour). The first page's 24 thumbnails are made once beforehand, as any earlier display of the
gallery (or ``%imagine history``) leaves them cached on disk.

Measured (median of several runs, wall clock, in this process: the widgets have no browser attached,
so what is timed is the kernel's side: SQLite query, thumbnail reads, widget creation and state
serialisation):
- ``studio_open_first_page``: ``Studio(session, History(...))`` on a freshly opened history: the
  whole studio (provider settings panel included) with its gallery's first page. Target <= 200 ms.
- ``gallery_first_page``: ``studio.show_page(0)`` on an open studio (what Refresh and every finished
  generation do). Target <= 200 ms.
- ``gallery_page_uncached``: a page whose thumbnails were never made (Pillow runs 24 times);
  informational.
- ``static_copy``: the static HTML copy of the gallery displayed after the live studio (what a saved
  notebook shows without its kernel), and its size in the notebook; informational.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from nbimagine._history import History
    from nbimagine._session import ImagineSession
    from nbimagine._widgets import Studio
    from nbimagine.events import BinaryResult
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nbimagine._history import History
    from nbimagine._session import ImagineSession
    from nbimagine._widgets import Studio
    from nbimagine.events import BinaryResult

TARGET_MS = 200.0
PER_PAGE = 24


def _picture(i: int, side: int = 320) -> bytes:
    import io

    from PIL import Image

    noise = Image.frombytes("L", (side // 4, side // 4), os.urandom((side // 4) ** 2)).resize((side, side))
    gradient = Image.linear_gradient("L").resize((side, side))
    image = Image.merge("RGB", (noise, gradient, Image.new("L", (side, side), (i * 37) % 256)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _build(root: Path, name: str, n: int) -> float:
    h = History(root, name)
    started = time.perf_counter()
    with h.batch():
        for i in range(n):
            h.add(BinaryResult(_picture(i), {"provider": "openai", "model": "gpt-image-1"}),
                  prompt=f"bench image {i}: a lighthouse on a cliff at dusk, watercolour",
                  params={"size": "1024x1024", "quality": "low"})
    for entry in h.page(0, PER_PAGE):
        entry.thumbnail(192)  # cached, as after the gallery's first display
    h.close()
    return time.perf_counter() - started


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main(root: str | os.PathLike[str] | None = None, entries: int = 1000, runs: int = 9) -> dict[str, Any]:
    """Run the benchmark, print one line per measure, and return the numbers (ms)."""
    tmp = Path(tempfile.mkdtemp(prefix="nbimagine-bench-widgets-", dir=root))
    session = ImagineSession()
    try:
        build_s = _build(tmp, "gallery", entries)
        print(f"built {entries} entries in {build_s:.1f} s (one 320x320 PNG each; first page thumbnails cached)")

        # Warm-up: imports (ipywidgets, Pillow) and the first widget classes are not the gallery's cost.
        warm = History(tmp, "gallery")
        Studio(session, warm).close()
        warm.close()

        opens, refreshes = [], []
        thumb_bytes = 0
        for _ in range(runs):
            h = History(tmp, "gallery")
            t0 = time.perf_counter()
            studio = Studio(session, h, per_page=PER_PAGE)
            opens.append(time.perf_counter() - t0)
            assert [i["id"] for i in studio.view.items] == list(range(entries, entries - PER_PAGE, -1))
            t0 = time.perf_counter()
            studio.show_page(0)
            refreshes.append(time.perf_counter() - t0)
            thumb_bytes = sum(len(i["thumb"] or "") for i in studio.view.items)  # as sent: data URLs
            studio.close()
            h.close()

        h = History(tmp, "gallery")
        studio = Studio(session, h, per_page=PER_PAGE)
        t0 = time.perf_counter()
        studio.show_page(5)  # never displayed: 24 thumbnails made now
        uncached = time.perf_counter() - t0
        snapshots = []
        for _ in range(runs):
            t0 = time.perf_counter()
            copy = studio.snapshot()  # the static copy a saved notebook keeps (12 thumbnails of 96 px)
            snapshots.append(time.perf_counter() - t0)
        copy_bytes = len(copy["text/html"]) + len(copy["text/plain"])
        studio.close()
        h.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = {
        "studio_open_first_page": (_median_ms(opens), TARGET_MS),
        "gallery_first_page": (_median_ms(refreshes), TARGET_MS),
        "gallery_page_uncached": (uncached * 1000, None),
        "static_copy": (_median_ms(snapshots), None),
    }
    out: dict[str, Any] = {"entries": entries, "build_seconds": round(build_s, 2),
                           "first_page_thumbnail_bytes": thumb_bytes, "static_copy_bytes": copy_bytes}
    for name, (value, target) in results.items():
        if target is None:
            print(f"{name}: {value:.1f} ms (informational)")
        else:
            print(f"{name}: {value:.1f} ms (target <= {target:.0f} ms) {'OK' if value <= target else 'OVER'}")
        out[name] = {"ms": round(value, 2), "target_ms": target,
                     "ok": None if target is None else value <= target}
    print(f"first page sends {thumb_bytes / 1024:.0f} KB of thumbnails ({PER_PAGE} tiles); the static copy a saved "
          f"notebook keeps is {copy_bytes / 1024:.0f} KB")
    return out


if __name__ == "__main__":
    main()
