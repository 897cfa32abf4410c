"""The notebooks execute headless and regenerate every committed figure (from the committed results)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, SUBPROCESS_TIMEOUT

COMMITTED = REPO / "notebooks" / "figures"


def test_notebooks_regenerate_every_committed_figure(tmp_path):
    env = {**os.environ, "PTQ4DM_FIGURES": str(tmp_path), "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, str(REPO / "notebooks" / "run_notebooks.py")], check=True, env=env,
                   timeout=SUBPROCESS_TIMEOUT)
    made = {p.name for p in tmp_path.glob("*.png")}
    committed = {p.name for p in COMMITTED.glob("*.png")}
    assert committed, "no committed figures"
    assert made == committed, f"missing: {committed - made}, not committed: {made - committed}"
    for name in made:
        assert (tmp_path / name).stat().st_size > 10_000, f"{name} looks empty"
