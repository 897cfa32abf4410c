"""Lightning DDP on 2 CPU processes (gloo) samples the same images and scores the same as 1 process."""

import json
import os
import socket
import subprocess
import sys

import torch

from ptq4dm.evaluation import load_shards
from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(run_dir, devices, cache):
    cmd = [sys.executable, "-m", "ptq4dm.evaluate", "eval.num_samples=12", "eval.batch_size=3", "sampler=ddpm",
           "sampler.steps=4", "trainer.accelerator=cpu", f"trainer.devices={devices}",
           f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", "trainer.enable_progress_bar=false",
           "metrics.kid_subset_size=4", f"hydra.run.dir={run_dir}"]
    # One thread per process in both runs: CPU convolutions sum in a thread-count dependent order.
    env = {**os.environ, "PTQ4DM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text()), load_shards(run_dir / "samples", 12)


def test_two_processes_give_the_images_and_metrics_of_one(tmp_path):
    one, images_one = _evaluate(tmp_path / "one", 1, tmp_path / "cache")
    two, images_two = _evaluate(tmp_path / "two", 2, tmp_path / "cache")
    assert torch.equal(images_one, images_two)  # stochastic DDPM: per-image seeds, not per-process streams
    assert one["fid"] == two["fid"] and one["sfid"] == two["sfid"]


def _ptq_run(run_dir, devices, cache):
    cmd = [sys.executable, "-m", "ptq4dm.run", "sampler.steps=5", "eval.num_samples=8", "eval.batch_size=2",
           "calib.num_samples=8", "calib.batch_size=8", "metric.num_candidates=20", "metric.max_values=4096",
           "metrics.kid_subset_size=4", "progress=false", "logger=none", "trainer.accelerator=cpu",
           f"trainer.devices={devices}", f"trainer.strategy={'ddp' if devices > 1 else 'auto'}",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PTQ4DM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text()), load_shards(run_dir / "samples", 8)


def test_calibration_and_quantized_sampling_under_ddp_match_one_process(tmp_path):
    one, images_one = _ptq_run(tmp_path / "one", 1, tmp_path / "cache1")
    two, images_two = _ptq_run(tmp_path / "two", 2, tmp_path / "cache2")
    assert torch.equal(images_one, images_two)  # each rank calibrated to the same ranges
    assert one["quantized"]["fid"] == two["quantized"]["fid"]
    assert one["fp"]["fid"] == two["fp"]["fid"]
