"""kill -9 during each stage of a sweep, then the same command: finished jobs intact byte for byte, the others
computed again or resumed to exactly the numbers of an uninterrupted sweep, one correct summary. The checks are
experiments/robustness/kill_and_resume.py's (which a reader runs on their own machine)."""

import importlib.util

import pytest

from tests.conftest import REPO, SUBPROCESS_TIMEOUT


def _script():
    spec = importlib.util.spec_from_file_location("kill_and_resume",
                                                  REPO / "experiments" / "robustness" / "kill_and_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_sweep_killed_in_any_stage_finishes_correctly_when_run_again(tmp_path):
    rows = _script().main(["--workdir", str(tmp_path), "--timeout", str(SUBPROCESS_TIMEOUT)])
    assert [r["stage"] for r in rows] == ["fp_samples", "calibration", "quantized_samples", "scoring"]
    for row in rows:
        assert row["ok"], row
    assert all(r["finished at kill"] == ["0"] for r in rows[1:])  # a finished job was there to keep intact
