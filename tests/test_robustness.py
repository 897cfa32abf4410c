"""Failures that must not cost a night of sweeps: half-written files, hostile checkpoints, cluster launchers."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from ptq4dm.utils.checkpoints import UnsafeCheckpointError, load_checkpoint
from tests.conftest import REPO, run_module_in_process
from tests.test_run import SMALL

WRITER = """
import sys, time
from ptq4dm.utils.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as f:
        f.write('{"status": "ok", "values": [')
        f.flush()
        print("writing", flush=True)
        for i in range(10**6):
            f.write(f"{i}, ")
            time.sleep(0.001)
"""


def test_a_job_killed_mid_write_leaves_no_result_file(tmp_path):
    target = tmp_path / "results.json"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()  # only a hidden temporary file is left, under another name
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".results.json.") and p.suffix == ".tmp" for p in leftovers)
    with pytest.raises(ValueError):
        json.loads(leftovers[0].read_text())  # and it is visibly incomplete


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=true"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_a_plain_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert load_checkpoint(path)["global_step"] == 3


def test_submitit_local_sweep(tmp_path, monkeypatch, capsys):
    """The same path a SLURM sweep takes (hydra-submitit-launcher), run locally: one job (each is a process of
    its own there; the basic launcher's multi-job sweeps are tested in test_run.py). The sweep itself runs as
    ``python -m`` runs it, in this process; the launcher pickles the job and runs it in a process of its own."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", "calib=uniform_ts", *SMALL,
            "logger=none", f"hydra.sweep.dir={sweep}", f"fp_cache_dir={tmp_path / 'fp'}"]
    monkeypatch.chdir(REPO)
    returncode = run_module_in_process("ptq4dm.run", args, monkeypatch)
    assert returncode == 0, capsys.readouterr().err[-3000:]
    result = json.loads((sweep / "0" / "results.json").read_text())
    assert result["status"] == "ok" and result["axes"]["calib"] == "uniform_ts"
    assert (sweep / "summary.md").exists()


def test_a_sweep_with_a_failed_job_exits_nonzero_and_summarises_only_its_own_jobs(tmp_path, monkeypatch, capsys):
    """Two jobs, the first of which needs real images that are not there: it is reported failed (with its
    overrides), the second still runs and finishes, the summary is written and the sweep exits 1. A job folder an earlier sweep left in the same
    place is not mixed into the summary (issue "Results you can trust", item 6). Run as ``python -m`` runs it,
    in this process: the exit status is the one the summary callback's sys.exit gives the process."""
    sweep = tmp_path / "sweep"
    leftover = sweep / "7"
    leftover.mkdir(parents=True)
    (leftover / "results.json").write_text(json.dumps({"status": "ok", "axes": {"calib": "raw"}, "fp": {},
                                                       "quantized": {"fid": 1.0}}))
    args = ["-m", "calib=forward_ts,gaussian_ts", *SMALL,
            f"data.root={tmp_path / 'no_data'}", f"hydra.sweep.dir={sweep}", f"fp_cache_dir={tmp_path / 'fp'}"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    returncode = run_module_in_process("ptq4dm.run", args, monkeypatch)
    stderr = capsys.readouterr().err
    assert returncode == 1, stderr[-3000:]
    assert "1 job(s) of this sweep failed: ['0']" in stderr
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["status"] for r in results] == ["failed", "ok"]
    assert "DataNotFoundError" in results[0]["error"] and "Traceback" in results[0]["traceback"]
    assert "calib=forward_ts" in results[0]["overrides"]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["calib"], r["status"]) for r in rows] == [
        ("0", "forward_ts", "failed"), ("1", "gaussian_ts", "ok")]
    assert "1 job folder(s) from earlier sweeps" in (sweep / "summary.md").read_text()
    assert len(list((sweep / "0").glob("wandb/offline-run-*/run-*.wandb"))) == 1  # the failure has its W&B run


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from ptq4dm.utils.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.partition == "gpu" and "export WANDB_MODE=offline" in launcher.setup
