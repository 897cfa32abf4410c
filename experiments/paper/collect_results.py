"""Copy what a sweep found into a small, committable folder: summary.csv/md (and summary_seeds.csv/md, recipes
over calibration seeds) and jobs.json (one record per job:
its overrides, axes, FP and quantized scores, timings, calibration time steps, reconstruction totals), plus the quantized sample grids of
the first jobs and one full-precision grid per set of FP images. Paths of the machine that ran it are replaced by
placeholders.

    python experiments/paper/collect_results.py multirun/table4_metric experiments/results/table4_metric --shared

``--shared`` first files the points of the sweep that table3_timesteps' jobs computed (SHARED_POINTS) under the
sweep, so that they run once and count in both. ``--previous OUT/jobs.json`` first rebuilds the jobs an earlier
machine ran (its collected records; only those the sweep folder does not hold) as job folders, so that one summary
covers the jobs of several sessions:

    python experiments/paper/collect_results.py multirun/main_10k experiments/results/main_10k_recon --grids 0 \
        --previous experiments/results/main_10k_recon/jobs.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from ptq4dm.experiment.summary import write_summary

KEEP = ("status", "from_sweep", "axes", "overrides", "num_samples", "num_calibration_samples", "fp", "quantized",
        "timings", "calibration_timesteps", "reconstruction", "reference", "seed", "calibration_seeds", "device",
        "error", "provenance")

# Points of the paper sweeps that are jobs of table3_timesteps (equal config digests: tests/test_experiments.py):
# sweep -> (the calib preset of the table3_timesteps job, the sweep's overrides for that point). The default GPU
# queue (queue.txt) leaves them out of the other sweeps.
SHARED_SOURCE = "table3_timesteps"
SHARED_POINTS = {
    "table2_calib_source": ("gaussian_ts", ("calib=gaussian_ts",)),
    "table4_metric": ("gaussian_ts", ("metric=mse",)),
    "table5_samplers": ("gaussian_ts", ("sampler=ddim",)),
    "table3_ndtc_grid": ("gaussian_ts", ("calib.timesteps.mean=0.4", "calib.timesteps.std=0.4")),
    "figure4_single_t": ("single_ts", ("calib.timesteps.t=0.5",)),
}
BITS = ("w8a8", "w4a8")


def collect(sweep_dir: Path, out: Path, grids: int = 2, shared: bool = False,
            previous: Path | None = None) -> list[dict]:
    if previous is not None:
        restore_previous(json.loads(previous.read_text()), sweep_dir)
    if shared and sweep_dir.name in SHARED_POINTS:
        calib, overrides = SHARED_POINTS[sweep_dir.name]
        for bits in BITS:
            source = sweep_dir.parent / SHARED_SOURCE / f"bits={bits},calib={calib}"
            if (source / "results.json").exists():
                file_shared_job(source, sweep_dir, overrides)
    write_summary(sweep_dir, every_folder=True)  # the queue fills one sweep folder in several invocations
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        record = json.loads(path.read_text())
        jobs.append({"job": path.parent.name, **{k: record[k] for k in KEEP if k in record}})
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1) + "\n")
    for name in ("summary.csv", "summary.md", "summary_seeds.csv", "summary_seeds.md"):
        if (sweep_dir / name).exists():
            text = (sweep_dir / name).read_text().replace(str(sweep_dir), f"multirun/{sweep_dir.name}")
            (out / name).write_text(text)
    copy_grids(sweep_dir, out, jobs, grids)
    return jobs


def restore_previous(records: list[dict], sweep_dir: Path) -> list[Path]:
    """Write each collected record of an earlier machine back as ``<sweep>/<job>/results.json``, skipping jobs the
    sweep folder already holds (this machine's own results are never replaced)."""
    restored = []
    for record in records:
        target = sweep_dir / record["job"]
        if (target / "results.json").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        results = {k: v for k, v in record.items() if k != "job"}
        (target / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        restored.append(target)
    return restored


def copy_grids(sweep_dir: Path, out: Path, jobs: list[dict], grids: int) -> None:
    """The quantized grids of the first ``grids`` jobs; one FP grid per sampler and simulation precision (jobs
    with both the same sample the same FP images)."""
    fp_done = set()
    for i, job in enumerate(jobs):
        folder, prefix = sweep_dir / job["job"], job["job"].replace("/", "_")
        precision = [o.lstrip("+") for o in job.get("overrides", []) if o.lstrip("+").startswith("eval.precision=")]
        images = (job.get("axes", {}).get("sampler"), *precision)
        fp_grid = folder / "samples_full_precision.png"
        if images not in fp_done and fp_grid.exists():
            shutil.copy(fp_grid, out / f"{prefix}__{fp_grid.name}")
            fp_done.add(images)
        if i < grids and (folder / "samples_quantized.png").exists():
            shutil.copy(folder / "samples_quantized.png", out / f"{prefix}__samples_quantized.png")


def file_shared_job(folder: Path, sweep_dir: Path, overrides: tuple[str, ...]) -> Path:
    """File a job of another sweep that computed one of this sweep's points (run once, used twice) under the name
    Hydra gives that point in this sweep, e.g. table3_timesteps' single_ts job as figure4_single_t's
    bits=w8a8,calib.timesteps.t=0.5; ``overrides`` name the point. Its sample grids come along."""
    if not overrides:
        raise ValueError("a shared job needs the overrides that name its point in this sweep")
    record = json.loads((folder / "results.json").read_text())
    parsed = OverridesParser.create().parse_overrides([f"bits={record['axes']['bits']}", *overrides])
    name = ",".join(sorted(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed))
    target = sweep_dir / name
    existing = target / "results.json"
    if existing.exists() and json.loads(existing.read_text()).get("from_sweep") is None:
        raise FileExistsError(f"{existing} holds this sweep's own job; a shared job would replace it")
    record["overrides"] = [*record.get("overrides", []), *overrides]
    record["from_sweep"] = f"{folder.parent.name}/{folder.name}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    for png in folder.glob("samples_*.png"):
        shutil.copy(png, target / png.name)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--grids", type=int, default=2, help="jobs whose quantized sample grids are copied")
    parser.add_argument("--shared", action="store_true",
                        help=f"file the sweep's points that {SHARED_SOURCE}' jobs computed (SHARED_POINTS) first")
    parser.add_argument("--previous", type=Path,
                        help="jobs.json of an earlier collection: its jobs missing here become job folders first")
    args = parser.parse_args()
    jobs = collect(args.sweep_dir, args.out, args.grids, args.shared, args.previous)
    print(f"{len(jobs)} jobs -> {args.out}")
