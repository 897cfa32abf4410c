"""Copy what a sweep found into a small, committable folder: summary.csv/md and jobs.json (one record per job:
its overrides, axes, FP and quantized scores, timings, calibration time steps), plus the quantized sample
grids of the first jobs and one full-precision grid. Paths of the machine that ran it are replaced by placeholders.

    python experiments/paper/collect_results.py multirun/table4_metric experiments/results/table4_metric
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ptq4dm.experiment.summary import write_summary

KEEP = ("status", "from_sweep", "axes", "overrides", "num_samples", "num_calibration_samples", "fp", "quantized",
        "timings", "calibration_timesteps", "reference", "seed", "device", "error")


def collect(sweep_dir: Path, out: Path, grids: int = 2, also: tuple[Path, ...] = (),
            also_overrides: tuple[str, ...] = ()) -> list[dict]:
    for folder in also:
        file_shared_job(folder, sweep_dir, also_overrides)
    write_summary(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        record = json.loads(path.read_text())
        jobs.append({"job": path.parent.name, **{k: record[k] for k in KEEP if k in record}})
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1) + "\n")
    for name in ("summary.csv", "summary.md"):
        if (sweep_dir / name).exists():
            text = (sweep_dir / name).read_text().replace(str(sweep_dir), f"multirun/{sweep_dir.name}")
            (out / name).write_text(text)
    for i, job in enumerate(jobs[:grids]):  # the FP grid once: every job of a sweep samples the same FP images
        for png in sorted((sweep_dir / job["job"]).glob("samples_*.png")):
            if i == 0 or "full_precision" not in png.name:
                shutil.copy(png, out / f"{job['job'].replace('/', '_')}__{png.name}")
    return jobs


def file_shared_job(folder: Path, sweep_dir: Path, overrides: tuple[str, ...]) -> None:
    """File a job of another sweep that computed one of this sweep's points (run once, used twice) under the name
    this sweep gives that point, e.g. table3_timesteps' single_ts job as figure4_single_t's calib.timesteps.t=0.5;
    ``overrides`` name the point."""
    record = json.loads((folder / "results.json").read_text())
    name = ",".join(sorted([f"bits={record['axes']['bits']}", *overrides]))
    target = sweep_dir / name / "results.json"
    if target.exists() and json.loads(target.read_text()).get("from_sweep") is None:
        raise FileExistsError(f"{target} holds this sweep's own job; --also would replace it")
    record["overrides"] = [*record.get("overrides", []), *overrides]
    record["from_sweep"] = f"{folder.parent.name}/{folder.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--grids", type=int, default=2, help="jobs whose FP/quantized sample grids are copied")
    parser.add_argument("--also", type=Path, nargs="*", default=(),
                        help="job folders of other sweeps that ran one of this sweep's configs (same config digest; "
                             "tests/test_experiments.py checks the pairs gpu_queue.sh relies on)")
    parser.add_argument("--also-overrides", nargs="*", default=(),
                        help="the point of this sweep those jobs computed, e.g. calib.timesteps.t=0.5 (their keys "
                             "at their preset values)")
    args = parser.parse_args()
    jobs = collect(args.sweep_dir, args.out, args.grids, tuple(args.also), tuple(args.also_overrides))
    print(f"{len(jobs)} jobs -> {args.out}")
