"""``make demo``: execute the quickstart notebook offline and keep the result in ``build/demo/``.

Runs ``notebooks/01_quickstart.ipynb`` in a fresh kernel with nbclient under the emulator
(``NBIMAGINE_EMULATOR=1``; no key is used even when one is set), then writes:

- ``build/demo/01_quickstart.ipynb``: the executed notebook, with its outputs;
- ``build/demo/images/``: every image it generated, full resolution, plus ``history.json``;
- ``build/demo/output/``: the files the notebook itself saved.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
OUT = ROOT / "build" / "demo"
# Offline means offline: the kernel must not see real credentials.
_KEY_VARS = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "GEMINI_API_KEY", "GOOGLE_API_KEY")


def main() -> int:
    import nbformat
    from nbclient import NotebookClient

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for var in _KEY_VARS:
        os.environ.pop(var, None)
    os.environ["NBIMAGINE_EMULATOR"] = "1"
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))

    # Jupyter Server tells a kernel its notebook this way; the history is then named after the notebook.
    os.environ["JPY_SESSION_NAME"] = str(OUT / NOTEBOOK.name)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel runs in build/demo, so the history and saved files land there, not in notebooks/.
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(OUT)}}).execute()
    executed = OUT / NOTEBOOK.name
    nbformat.write(nb, executed)

    sys.path.insert(0, str(ROOT / "src"))
    from nbimagine._history import History, notebook_name

    history = History(OUT, notebook_name())
    exported = history.export(OUT / "images")
    history.close()
    images = [p for p in exported if p.suffix != ".json"]

    print(f"Executed notebook: {executed} ({executed.stat().st_size / 1024:.0f} KB)")
    print(f"Images ({len(images)}, full resolution) in {OUT / 'images'}:")
    for path in images:
        print(f"  {path}")
    saved = sorted((OUT / "output").glob("*")) if (OUT / "output").exists() else []
    for path in saved:
        print(f"Saved by the notebook: {path}")
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
