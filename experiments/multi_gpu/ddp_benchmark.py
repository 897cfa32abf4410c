"""Multi-device evaluation: one PTQ job (FP and quantized sampling, calibration, scoring) on 1 and on N devices
through Lightning DDP, timed, with a check that both runs give the same images and metrics.

    # the measurement the issue asks for (a two-GPU machine):
    python experiments/multi_gpu/ddp_benchmark.py --accelerator gpu --devices 1 2 \
        --out experiments/results/multi_gpu/ddp_gpu.json
    # the code path on 2 CPU processes (gloo), at small sizes:
    python experiments/multi_gpu/ddp_benchmark.py --accelerator cpu --devices 1 2 --small \
        --out experiments/results/multi_gpu/ddp_cpu.json

Each run gets its own empty cache, so both sample their FP images too. Images are compared as the uint8 shards
each run wrote (FP from its cache, quantized from the job folder); metrics as the numbers in results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptq4dm.evaluation import load_shards
from ptq4dm.experiment.job import JobFolder
from ptq4dm.metrics.scoring import pixel_errors

REPO = Path(__file__).resolve().parents[2]
# small_cifar10, DDIM 100, 10k images, W8A8, NDTC + MSE: the headline job of experiments/paper (main_10k)
FULL = ["model=small_cifar10", "experiment=paper_scale", "bits=w8a8", "sampler=ddim", "sampler.steps=100",
        "eval.num_samples=10000", "eval.batch_size=1000"]
SMALL = ["model=tiny_cifar10", "sampler.steps=5", "eval.num_samples=16", "eval.batch_size=2", "calib.num_samples=8",
         "calib.batch_size=8", "metric.num_candidates=20", "metric.max_values=4096", "metrics.kid_subset_size=4"]
COMPARED = ("fid", "sfid", "kid", "precision", "recall", "fid_vs_fp", "psnr_vs_fp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: list[str], accelerator: str, devices: int, workdir: Path, threads: int | None) -> dict:
    run_dir, cache = workdir / f"devices{devices}", workdir / f"cache{devices}"
    cmd = [sys.executable, "-m", "ptq4dm.run", *overrides, "logger=none", "progress=false",
           f"trainer.accelerator={accelerator}", f"trainer.devices={devices}",
           f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PTQ4DM_CACHE": str(cache), "MASTER_PORT": str(free_port())}
    if threads:  # CPU convolutions sum in a thread-count dependent order: same count in every run
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"devices={devices} failed:\n{proc.stderr[-4000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    n = results["num_samples"]
    fp_shards = next((cache / "fp_samples").glob("*/shards"))
    return {"devices": devices, "wall_seconds": wall, "results": results,
            "images": {"fp": load_shards(fp_shards, n),
                       "quantized": load_shards(JobFolder(run_dir).quantized_samples_dir(), n)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--small", action="store_true", help="tiny model and sample counts (a CPU check)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides of conf/run.yaml")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args()
    overrides = [*(SMALL if args.small else FULL), *args.overrides]
    threads = 1 if args.accelerator == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="ddp_benchmark_") as tmp:
        runs = [launch(overrides, args.accelerator, d, Path(tmp), threads) for d in args.devices]
    base = runs[0]
    report = {
        "command": " ".join(["python", *sys.argv]),
        "overrides": overrides,
        "machine": torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads_per_process": threads,
        "runs": [],
    }
    for run in runs:
        r = run["results"]
        same = {kind: bool(torch.equal(run["images"][kind], base["images"][kind])) for kind in ("fp", "quantized")}
        # If a GPU run is not bit-identical (kernels that sum in another order), say how close it is (identical
        # images read psnr_db 100, the cap of pixel_errors).
        closeness = {kind: {"pixels_equal": float((run["images"][kind] == base["images"][kind]).float().mean()),
                            "psnr_db": pixel_errors(run["images"][kind], base["images"][kind])["psnr_vs_fp"]}
                     for kind in ("fp", "quantized")}
        metrics = {f"{group}_{k}": r[group].get(k) for group in ("fp", "quantized") for k in COMPARED
                   if r[group].get(k) is not None}
        base_metrics = {f"{group}_{k}": base["results"][group].get(k) for group in ("fp", "quantized")
                        for k in COMPARED}
        report["runs"].append({
            "devices": run["devices"],
            "wall_seconds": round(run["wall_seconds"], 2),
            "speedup_vs_first": round(base["wall_seconds"] / run["wall_seconds"], 3),
            "sampling_seconds_fp": r["timings"]["sampling_seconds_fp"],
            "sampling_seconds_quantized": r["timings"]["sampling_seconds_quantized"],
            "calibration_seconds": r["timings"].get("calibration_seconds"),
            "images_equal_to_first": same,
            "images_vs_first": closeness,
            "metrics_equal_to_first": all(metrics[k] == base_metrics[k] for k in metrics),
            "metrics": metrics,
        })
    text = json.dumps(report, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)
    if not all(all(r["images_equal_to_first"].values()) and r["metrics_equal_to_first"] for r in report["runs"]):
        sys.exit("the runs disagree: see the report")


if __name__ == "__main__":
    main()
