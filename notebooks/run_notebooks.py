"""Execute every notebook here, headless, and so regenerate notebooks/figures/*.png from the committed results.

    python notebooks/run_notebooks.py                 # all notebooks
    python notebooks/run_notebooks.py activation_ranges.ipynb
    PTQ4DM_FIGURES=/tmp/figs python notebooks/run_notebooks.py   # figures elsewhere

The notebooks are committed without outputs; this runs them in memory (nbclient) and does not rewrite them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def run_notebook(path: Path, timeout: int = 900) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        t0 = time.perf_counter()
        run_notebook(path)
        print(f"{path.name}: ok ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
