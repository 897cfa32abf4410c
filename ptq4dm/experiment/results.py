"""Read collected sweep results (``experiments/results/<experiment>/jobs.json``) as flat rows, one per job."""

from __future__ import annotations

import json
from pathlib import Path

SCORES = ("fid", "sfid", "kid", "precision", "recall", "fid_vs_fp", "psnr_vs_fp", "fid_over_fp", "fid_over_fp_se")


def load_jobs(folder: str | Path) -> list[dict]:
    """Finished jobs of one experiment: axes, the overrides of single keys (``calib.timesteps.t``), FP and
    quantized scores (``fp_fid``, ``fid``, ...), timings and the calibration time steps."""
    rows = []
    for job in json.loads((Path(folder) / "jobs.json").read_text()):
        if job.get("status") != "ok":
            continue
        overrides = dict(o.split("=", 1) for o in job.get("overrides", []) if "=" in o)
        row = {**job["axes"], **{k: v for k, v in overrides.items() if "." in k},
               "num_samples": job.get("num_samples"), "calibration_timesteps": job.get("calibration_timesteps")}
        row.update({f"fp_{k}": job["fp"].get(k) for k in SCORES[:5]})
        row.update({k: job["quantized"].get(k) for k in SCORES})
        row.update({k: v for k, v in job.get("timings", {}).items()})
        rows.append(row)
    return rows


def load_all(root: str | Path) -> dict[str, list[dict]]:
    """Every experiment folder under ``root`` that holds a jobs.json, by name."""
    return {p.parent.name: load_jobs(p.parent) for p in sorted(Path(root).glob("*/jobs.json"))}
