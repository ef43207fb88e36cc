"""Run every benchmark with one command: ``make bench`` (or ``python benchmarks/run.py [name ...]``).

Each benchmark measures its own baseline in the same run and prints ratios against it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = ["bench_openai", "bench_images", "bench_gemini", "bench_cost", "bench_history", "bench_notebook",
              "bench_widgets", "bench_display", "bench_background", "bench_sets", "bench_emulator"]


def main(names: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    failed = []
    for name in names or BENCHMARKS:
        if not (Path(__file__).parent / f"{name}.py").exists():
            print(f"== {name}: not present, skipped\n")
            continue
        print(f"== {name}")
        try:
            importlib.import_module(name).main()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"!! {name} failed: {exc!r}")
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
