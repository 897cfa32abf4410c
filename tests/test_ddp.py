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


def _start(overrides, run_dir, devices, cache, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ptq4dm.run", *overrides, "trainer.accelerator=cpu", f"trainer.devices={devices}",
           f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"hydra.run.dir={run_dir}"]
    # One thread per process in both runs: CPU convolutions sum in a thread-count dependent order.
    env = {**os.environ, "PTQ4DM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    with open(log, "w") as out:  # a file rather than a pipe: neither job waits for its output to be read
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, run_dir, log, num_samples):
    proc.wait(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, log.read_text()[-3000:]
    shards = JobFolder(run_dir).quantized_samples_dir()
    return json.loads((run_dir / "results.json").read_text()), load_shards(shards, num_samples)


PTQ_RUN = ["sampler=ddpm", "sampler.steps=5", "eval.num_samples=8", "eval.batch_size=2", "calib.num_samples=8",
           "calib.batch_size=8", "metric.num_candidates=20", "metric.max_values=4096", "metrics.kid_subset_size=4", "progress=false",
           "logger=none"]


def test_calibration_and_sampling_under_ddp_give_the_images_and_metrics_of_one_process(tmp_path):
    """A whole job (FP sampling, calibration on rank 0, quantized sampling, scoring) on 2 processes and on 1.
    Stochastic DDPM: the same images only if every image has its own seed rather than each process a stream.
    ``ptq4dm.evaluate`` samples through the same code (ptq4dm/evaluation).

    The two jobs are independent (own folders, caches and ports) and each process runs one thread, so they run
    side by side: three single-threaded processes on the CI machine's two cores."""
    procs = [_start(PTQ_RUN, tmp_path / name, devices, tmp_path / f"cache{devices}", tmp_path / f"{name}.log")
             for name, devices in (("two", 2), ("one", 1))]
    try:
        two, images_two = _finish(procs[0], tmp_path / "two", tmp_path / "two.log", 8)
        one, images_one = _finish(procs[1], tmp_path / "one", tmp_path / "one.log", 8)
    finally:
        for proc in procs:  # after a failure, no job is left running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert torch.equal(images_one, images_two)  # each rank calibrated to the same ranges, per-image seeds
    assert one["quantized"]["fid"] == two["quantized"]["fid"]
    assert one["fp"]["fid"] == two["fp"]["fid"] and one["fp"]["sfid"] == two["fp"]["sfid"]
