"""Copy what a sweep found into a small, committable folder: summary.csv/md and jobs.json (one record per job:
its overrides, axes, FP and quantized scores, timings, calibration time steps), plus sample grids of the
first jobs. Paths of the machine that ran it are replaced by placeholders.

    python experiments/paper/collect_results.py multirun/table4_metric experiments/results/table4_metric
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ptq4dm.experiment.summary import write_summary

KEEP = ("status", "axes", "overrides", "num_samples", "num_calibration_samples", "fp", "quantized", "timings",
        "calibration_timesteps", "reference", "seed", "device", "error")


def collect(sweep_dir: Path, out: Path, grids: int = 2, also: tuple[Path, ...] = ()) -> list[dict]:
    write_summary(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        record = json.loads(path.read_text())
        jobs.append({"job": path.parent.name, **{k: record[k] for k in KEEP if k in record}})
    for folder in also:  # a job of another sweep with this sweep's config for one of its points: run once, used twice
        record = json.loads((folder / "results.json").read_text())
        jobs.append({"job": folder.name, "from_sweep": folder.parent.name, **{k: record[k] for k in KEEP if k in record}})
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1) + "\n")
    for name in ("summary.csv", "summary.md"):
        if (sweep_dir / name).exists():
            text = (sweep_dir / name).read_text().replace(str(sweep_dir), f"multirun/{sweep_dir.name}")
            (out / name).write_text(text)
    for job in jobs[:grids]:
        for png in sorted((sweep_dir / job["job"]).glob("samples_*.png")):
            shutil.copy(png, out / f"{job['job'].replace('/', '_')}__{png.name}")
    return jobs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--grids", type=int, default=2, help="jobs whose FP/quantized sample grids are copied")
    parser.add_argument("--also", type=Path, nargs="*", default=(),
                        help="job folders of other sweeps that ran one of this sweep's configs (same config digest)")
    args = parser.parse_args()
    print(f"{len(collect(args.sweep_dir, args.out, args.grids, tuple(args.also)))} jobs -> {args.out}")
