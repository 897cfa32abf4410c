"""One table over all jobs of a multirun: a column per varied axis, then the headline metrics."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptq4dm.experiment.recipe import AXES
from ptq4dm.utils.io import atomic_write_text
from ptq4dm.utils.table import markdown_table

log = logging.getLogger(__name__)

METRICS = ("fid", "sfid", "kid", "precision", "recall", "fid_vs_fp", "psnr_vs_fp", "calibration_seconds")


def summary_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        r = json.loads(path.read_text())
        row = {"job": path.parent.name, **r.get("axes", {}), **_settings(r.get("overrides", [])),
               "status": r.get("status", "?")}
        quantized, fp = r.get("quantized", {}), r.get("fp", {})
        row["fp_fid"] = fp.get("fid")
        row.update({m: quantized.get(m, r.get("timings", {}).get(m)) for m in METRICS})
        if r.get("status") == "failed":
            row["error"] = r.get("error", "")[:120]
        rows.append(row)
    return rows


def _settings(overrides: list[str]) -> dict:
    """Overrides of single keys below an axis (``calib.timesteps.t=0.25``): columns when they vary."""
    pairs = (o.split("=", 1) for o in overrides if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if "." in k and k.split(".")[0] in AXES}


def write_summary(sweep_dir: str | Path) -> str | None:
    """Write ``summary.csv`` and ``summary.md`` in ``sweep_dir``; returns the markdown (None if no jobs)."""
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir)
    if not rows:
        return None
    settings = sorted({k for row in rows for k in row if "." in k})
    varied = [a for a in [*AXES, *settings] if len({row.get(a) for row in rows}) > 1] or ["calib", "metric"]
    columns = ["job", *varied, "status", "fp_fid", *METRICS] + (["error"] if any("error" in r for r in rows) else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())
    table = markdown_table(rows, columns)
    atomic_write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir}\n\n{table}\n")
    return table


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise its jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        table = write_summary(config.hydra.sweep.dir)
        if table:
            print(f"\nSweep summary ({config.hydra.sweep.dir}/summary.md):\n{table}")
