"""The tutorial notebooks, executed by nbmake in fresh kernels, offline (``NBIMAGINE_EMULATOR=1``).

They run from a temporary copy so that their history (``.nbimagine/``) and saved files stay out of
the repository. Any failing cell fails the test, with the cell's source and traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_editing.ipynb", "03_providers.ipynb", "04_python_api.ipynb",
         "05_image_sets.ipynb"]


def test_readme_says_how_to_open_the_tutorials_from_the_venv():
    # The command the README gives works in the environment `make install` builds: jupyter lab is installed
    # next to this Python, and the folder it names holds the tutorials.
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    assert "`.venv/bin/jupyter lab notebooks/`" in readme
    assert (Path(sys.executable).parent / "jupyter-lab").exists() or shutil.which("jupyter-lab")
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


def test_notebooks_are_saved_clean():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        nb = json.loads((NOTEBOOKS / name).read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name


@pytest.mark.timeout(600)
def test_notebooks_run_offline_under_nbmake(tmp_path):
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, work)
    # conftest has already removed every real key from os.environ.
    env = {**os.environ, "NBIMAGINE_EMULATOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbmake", "--nbmake-timeout=120", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(work), *NAMES],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "5 passed" in result.stdout
    # The notebooks really generated and saved images (into the copy, not the repo).
    assert (work / "output" / "fox.png").is_file()
    assert (work / ".nbimagine").is_dir()
    assert not (NOTEBOOKS / ".nbimagine").exists()
