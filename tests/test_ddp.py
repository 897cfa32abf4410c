"""Lightning DDP on 2 CPU processes (gloo) samples the same images and scores the same as 1 process."""

import json
import os
import socket
import subprocess
import sys

import torch

from ptq4dm.evaluation import load_shards
from ptq4dm.experiment.job import JobFolder
from tests.conftest import REPO, SUBPROCESS_TIMEOUT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(module, overrides, run_dir, devices, cache, num_samples):
    cmd = [sys.executable, "-m", module, *overrides, "trainer.accelerator=cpu", f"trainer.devices={devices}",
           f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"hydra.run.dir={run_dir}"]
    # One thread per process in both runs: CPU convolutions sum in a thread-count dependent order.
    env = {**os.environ, "PTQ4DM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = JobFolder(run_dir).quantized_samples_dir() if module == "ptq4dm.run" else run_dir / "samples"
    return json.loads((run_dir / "results.json").read_text()), load_shards(shards, num_samples)


EVALUATE = ["eval.num_samples=12", "eval.batch_size=3", "sampler=ddpm", "sampler.steps=4",
            "trainer.enable_progress_bar=false", "metrics.kid_subset_size=4"]
PTQ_RUN = ["sampler.steps=5", "eval.num_samples=8", "eval.batch_size=2", "calib.num_samples=8", "calib.batch_size=8",
           "metric.num_candidates=20", "metric.max_values=4096", "metrics.kid_subset_size=4", "progress=false",
           "logger=none"]


def test_two_processes_give_the_images_and_metrics_of_one(tmp_path):
    one, images_one = _launch("ptq4dm.evaluate", EVALUATE, tmp_path / "one", 1, tmp_path / "cache", 12)
    two, images_two = _launch("ptq4dm.evaluate", EVALUATE, tmp_path / "two", 2, tmp_path / "cache", 12)
    assert torch.equal(images_one, images_two)  # stochastic DDPM: per-image seeds, not per-process streams
    assert one["fid"] == two["fid"] and one["sfid"] == two["sfid"]


def test_calibration_and_quantized_sampling_under_ddp_match_one_process(tmp_path):
    one, images_one = _launch("ptq4dm.run", PTQ_RUN, tmp_path / "one", 1, tmp_path / "cache1", 8)
    two, images_two = _launch("ptq4dm.run", PTQ_RUN, tmp_path / "two", 2, tmp_path / "cache2", 8)
    assert torch.equal(images_one, images_two)  # each rank calibrated to the same ranges
    assert one["quantized"]["fid"] == two["quantized"]["fid"]
    assert one["fp"]["fid"] == two["fp"]["fid"]
