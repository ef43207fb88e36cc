"""Benchmark of showing what a provider returned (issue 9): hostile sizes, long texts, huge inputs.

Run ``python benchmarks/bench_display.py``; ``benchmarks/run.py`` calls :func:`main`. Every memory
figure comes from a fresh subprocess (``ru_maxrss`` after minus before the measured step).

Measured:
- ``huge_png_display``: the output of one 13000x13000 PNG (1.5 MB on the wire, 169 megapixels) as
  ``%%imagine`` makes it (bounded decoding: PNG in bands). Target <= 300 MB added peak RSS, <= 2 s.
  Baseline in the same run: the plain Pillow way (decode whole, then resize), as before issue 9.
- ``huge_png_thumbnail``: the history's thumbnail of that image (bounded too).
- ``huge_png_n4_cell``: a whole ``%%imagine -n 4`` cell whose four answers are that PNG, emulator in
  the same process (its drawing cached before measuring). Target <= 600 MB added peak RSS.
- ``revised_prompt_1mb_output_bytes``: the outputs of one image whose revised prompt and reply text
  are 1 MB each. Target <= 150 KB.
- ``photo_output_bytes``: the saved outputs of a detailed 1024x1024 photo-like image (noise and
  gradients). Target <= 90 KB (the emulator drawing: see bench_notebook, target <= 60 KB).
- ``edit_3gb_file_read_bytes``: ``%%imagine -e big.bin`` with a 3 GB (sparse) file: bytes the
  process read before refusing it. Target < 10 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PRELUDE = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT / "src")!r})
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def _child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "NBIMAGINE_EMULATOR": ""}, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_huge_png() -> dict[str, float]:
    ours = _child("""
        from nbimagine.emulator._hostile import huge_png
        from nbimagine.events import BinaryResult
        from nbimagine._display import caption_for, image_output
        import PIL.Image, PIL.JpegImagePlugin, PIL.PngImagePlugin  # imports are not what is measured
        image = BinaryResult(huge_png(13000, 13000))
        before = peak_mb(); t = time.perf_counter()
        data, metadata, problem = image_output(image, caption_for(image))
        print(json.dumps({"s": time.perf_counter() - t, "mb": peak_mb() - before, "ok": problem is None}))
    """)
    baseline = _child("""
        import io, warnings
        from nbimagine.emulator._hostile import huge_png
        from PIL import Image
        data = huge_png(13000, 13000)
        warnings.simplefilter("ignore")
        before = peak_mb(); t = time.perf_counter()
        image = Image.open(io.BytesIO(data)); image.load()
        image = image.resize((768, 768), Image.Resampling.LANCZOS)
        buffer = io.BytesIO(); image.save(buffer, "JPEG", quality=85)
        print(json.dumps({"s": time.perf_counter() - t, "mb": peak_mb() - before}))
    """)
    thumb = _child("""
        import tempfile
        from nbimagine.emulator._hostile import huge_png
        from nbimagine.events import BinaryResult
        from nbimagine._history import History
        import PIL.Image, PIL.JpegImagePlugin, PIL.PngImagePlugin
        h = History(tempfile.mkdtemp(), "bench")
        entry = h.add(BinaryResult(huge_png(13000, 13000)), prompt="huge")
        before = peak_mb(); t = time.perf_counter()
        entry.thumbnail(192)
        print(json.dumps({"s": time.perf_counter() - t, "mb": peak_mb() - before}))
    """)
    cell = _child("""
        import os, tempfile
        os.chdir(tempfile.mkdtemp())
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.core.displaypub import CapturingDisplayPublisher
        from nbimagine.emulator._hostile import huge_png
        huge_png(13000, 13000)  # the emulator's drawing, cached: not what is measured
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "nbimagine")
        ip.run_line_magic("imagine", "emulator on")
        ip.display_pub = CapturingDisplayPublisher()
        ip.run_cell_magic("imagine", "-n 4 --no-history", "warm-up")
        ip.display_pub.outputs.clear()
        before = peak_mb(); t = time.perf_counter()
        ip.run_cell_magic("imagine", "-n 4 -o rs", "a mural [fault:huge_png]")
        shown = sum(1 for o in ip.display_pub.outputs if "image/jpeg" in o["data"] and not o["update"])
        print(json.dumps({"s": time.perf_counter() - t, "mb": peak_mb() - before, "shown": shown}))
    """)
    assert ours["ok"] and cell["shown"] == 4
    return {
        "huge_png_display_s": round(ours["s"], 2), "huge_png_display_added_peak_mb": round(ours["mb"]),
        "baseline_whole_decode_s": round(baseline["s"], 2),
        "baseline_whole_decode_added_peak_mb": round(baseline["mb"]),
        "memory_ratio_vs_baseline": round(ours["mb"] / max(baseline["mb"], 1), 3),
        "huge_png_thumbnail_s": round(thumb["s"], 2), "huge_png_thumbnail_added_peak_mb": round(thumb["mb"]),
        "huge_png_n4_cell_s": round(cell["s"], 2), "huge_png_n4_cell_added_peak_mb": round(cell["mb"]),
    }


def bench_output_bytes() -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(Path(__file__).parent))
    from nbimagine._display import caption_for, caption_output, image_output, text_output
    from nbimagine.events import BinaryResult

    def saved(image: BinaryResult, body: str) -> int:
        data, metadata, _ = image_output(image, caption_for(image, elapsed=9.0))
        outputs = [{"output_type": "display_data", "data": text_output(body), "metadata": {}},
                   {"output_type": "display_data", "data": data, "metadata": metadata},
                   {"output_type": "display_data", "data": caption_output(data["text/plain"]), "metadata": {}}]
        return len(json.dumps(outputs, indent=1))

    from bench_notebook import photo_png

    png = photo_png()
    meta = {"provider": "openai", "model": "gpt-image-1", "history_id": 1}
    photo_bytes = saved(BinaryResult(png, {**meta, "revised_prompt": "a detailed photo"}),
                        "Here is the image.")
    long = ("a very long revised prompt, " * 40_000)[:1_048_576]
    long_bytes = saved(BinaryResult(png, {**meta, "revised_prompt": long}), long)
    return {"photo_output_bytes": photo_bytes, "revised_prompt_1mb_output_bytes": long_bytes}


def bench_big_edit_file() -> dict[str, float]:
    return _child("""
        import os, tempfile
        from pathlib import Path
        folder = tempfile.mkdtemp(); os.chdir(folder)
        big = Path(folder) / "big.bin"
        with big.open("wb") as f:
            f.write(b"\\x89PNG\\r\\n\\x1a\\n"); f.truncate(3 * 1024**3)  # sparse: nothing on disk
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.core.error import UsageError
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "nbimagine")
        ip.run_line_magic("imagine", "emulator on")
        def rchar():
            return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
        before = rchar()
        try:
            ip.run_cell_magic("imagine", f"-e {big}", "make it blue")
            refused = False
        except UsageError:
            refused = True
        print(json.dumps({"edit_3gb_file_read_bytes": rchar() - before, "edit_3gb_file_refused": refused,
                          "peak_rss_mb": round(peak_mb())}))
    """)


def main() -> dict[str, float]:
    results = {}
    for bench in (bench_output_bytes, bench_big_edit_file, bench_huge_png):
        results.update(bench())
    targets = {"huge_png_display_s": 2, "huge_png_display_added_peak_mb": 300, "huge_png_n4_cell_added_peak_mb": 600,
               "photo_output_bytes": 90 * 1024, "revised_prompt_1mb_output_bytes": 150 * 1024,
               "edit_3gb_file_read_bytes": 10 * 1024**2}
    width = max(map(len, results))
    for key, value in results.items():
        target = f"  (target <= {targets[key]})" if key in targets else ""
        print(f"{key:<{width}}  {value}{target}")
    return results


if __name__ == "__main__":
    main()
