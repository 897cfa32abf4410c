"""The notebooks execute headless and regenerate every committed figure (from the committed results)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, SUBPROCESS_TIMEOUT

NOTEBOOKS = REPO / "notebooks"
COMMITTED = NOTEBOOKS / "figures"


def test_notebooks_regenerate_every_committed_figure(tmp_path):
    """Every notebook through notebooks/run_notebooks.py, one process (and kernel) each, side by side: the
    notebooks are independent, and while one computes on both cores the others' kernels start and plot."""
    env = {**os.environ, "PTQ4DM_FIGURES": str(tmp_path), "MPLBACKEND": "Agg"}
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names, "no notebooks"
    logs = {name: tmp_path / f"{name}.log" for name in names}
    procs = {}
    try:
        for name in names:
            with open(logs[name], "w") as out:  # a file rather than a pipe: no run waits for its output to be read
                procs[name] = subprocess.Popen([sys.executable, str(NOTEBOOKS / "run_notebooks.py"), name], env=env,
                                               stdout=out, stderr=subprocess.STDOUT)
        for name, proc in procs.items():
            assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == 0, f"{name}: {logs[name].read_text()[-3000:]}"
    finally:
        for proc in procs.values():  # after a failure, no notebook is left running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    made = {p.name for p in tmp_path.glob("*.png")}
    committed = {p.name for p in COMMITTED.glob("*.png")}
    assert committed, "no committed figures"
    assert made == committed, f"missing: {committed - made}, not committed: {made - committed}"
    for name in made:
        assert (tmp_path / name).stat().st_size > 10_000, f"{name} looks empty"
