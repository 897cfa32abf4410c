"""One table over the jobs of a multirun: a column per varied axis, then the headline metrics.

A sweep knows its own jobs: when it starts, the ``SweepSummary`` callback gives it an id
(``<sweep dir>/.ptq4dm_sweep.json``), and each job records its outcome under that id
(``<sweep dir>/.ptq4dm_jobs/<id>/<job num>.json``, outside the job's folder, so a finished job's files stay
byte for byte as they were). The summary lists exactly those jobs, so folders an earlier sweep left in the same
place are not mixed in (their count is noted under the table). The process exits non-zero, after writing the
summary, when any job of the sweep failed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptq4dm.experiment import over_seeds
from ptq4dm.experiment.job import FAILURE, RESULTS
from ptq4dm.experiment.recipe import AXES
from ptq4dm.utils.io import atomic_write_json, atomic_write_text
from ptq4dm.utils.table import markdown_table

log = logging.getLogger(__name__)

METRICS = ("fid", "fid_over_fp", "fid_over_fp_se", "sfid", "kid", "precision", "recall", "fid_vs_fp", "psnr_vs_fp",
           "calibration_seconds")
SWEEP_FILE, RECORDS_DIR = ".ptq4dm_sweep.json", ".ptq4dm_jobs"


def start_sweep(sweep_dir: str | Path) -> str:
    """A new id for the sweep about to run in ``sweep_dir``."""
    sweep_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    atomic_write_json(Path(sweep_dir) / SWEEP_FILE, {"id": sweep_id, "started": time.time()})
    return sweep_id


def current_sweep(sweep_dir: str | Path) -> str | None:
    try:
        return json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())["id"]
    except (OSError, ValueError, KeyError):
        return None


def record_job(sweep_dir: str | Path, job_num: int, job_dir: str | Path, status: str, outcome: str,
               overrides: list[str]) -> None:
    """A job's outcome in this sweep: ``status`` ok or failed, ``outcome`` the file in its folder that says it."""
    sweep_id = current_sweep(sweep_dir)
    if sweep_id is None:  # a sweep started without the callback: the summary reads every folder
        return
    sweep_dir, job_dir = Path(sweep_dir), Path(job_dir)
    try:
        where = str(job_dir.resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        where = str(job_dir.resolve())
    atomic_write_json(sweep_dir / RECORDS_DIR / sweep_id / f"{job_num}.json",
                      {"job": where, "status": status, "outcome": outcome, "overrides": overrides})


def _jobs(sweep_dir: Path, every_folder: bool = False) -> tuple[list[tuple[str, dict, str]], int]:
    """(job name, outcome record, status) of this sweep's jobs (of every job folder with ``every_folder``), and
    how many other job folders are here."""
    folders = sorted((p.parent for p in sweep_dir.glob(f"*/{RESULTS}")), key=lambda p: (len(p.name), p.name))
    sweep_id = None if every_folder else current_sweep(sweep_dir)
    records = sorted((sweep_dir / RECORDS_DIR / sweep_id).glob("*.json"), key=lambda p: int(p.stem)) \
        if sweep_id else []
    if not records:  # no sweep id (or no job recorded yet): every folder, as they are
        return [(p.name, _read(p / RESULTS), _read(p / RESULTS).get("status", "?")) for p in folders], 0
    jobs, mine = [], set()
    for path in records:
        rec = json.loads(path.read_text())
        folder = (sweep_dir / rec["job"]).resolve()
        mine.add(folder)
        outcome = _read(folder / rec.get("outcome", RESULTS))
        outcome.setdefault("overrides", rec.get("overrides", []))
        jobs.append((rec["job"], outcome, rec["status"]))
    return jobs, sum(1 for p in folders if p.resolve() not in mine)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "failed", "error": f"{path.name} missing or unreadable"}


def summary_rows(sweep_dir: Path) -> list[dict]:
    return _rows(_jobs(Path(sweep_dir))[0])


def _rows(jobs: list[tuple[str, dict, str]]) -> list[dict]:
    rows = []
    for name, r, status in jobs:
        row = {"job": name, **r.get("axes", {}), **_settings(r.get("overrides", [])), "status": status}
        quantized, fp = (r.get("quantized", {}), r.get("fp", {})) if status == "ok" else ({}, {})
        row["fp_fid"] = fp.get("fid")
        if status == "ok":
            row.update({m: quantized.get(m, r.get("timings", {}).get(m)) for m in METRICS})
            row["fid_over_fp"] = over_seeds.fid_over_fp(r)  # also for jobs older than its key
        if status != "ok":
            row["error"] = r.get("error", "")[:120]
        rows.append(row)
    return rows


def _settings(overrides: list[str]) -> dict:
    """Overrides of single keys below an axis (``calib.timesteps.t=0.25``): columns when they vary."""
    pairs = (o.split("=", 1) for o in overrides if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if "." in k and k.split(".")[0] in AXES}


def write_summary(sweep_dir: str | Path, every_folder: bool = False) -> str | None:
    """Write ``summary.csv`` and ``summary.md`` in ``sweep_dir`` over the jobs of the sweep that ran last there
    (over every job folder with ``every_folder``: several invocations filling one folder), and the seed table if
    a recipe ran at several calibration seeds; returns the markdown (None if no jobs)."""
    sweep_dir = Path(sweep_dir)
    jobs, others = _jobs(sweep_dir, every_folder)
    rows = _rows(jobs)
    if not rows:
        write_seed_summary(sweep_dir, jobs)  # removes a seed table an earlier sweep left
        return None
    settings = sorted({k for row in rows for k in row if "." in k})
    varied = [a for a in [*AXES, *settings] if len({row.get(a) for row in rows}) > 1] or ["calib", "metric"]
    columns = ["job", *varied, "status", "fp_fid", *METRICS] + (["error"] if any("error" in r for r in rows) else [])
    _write_csv(sweep_dir / "summary.csv", rows, columns)
    table = markdown_table(rows, columns)
    if others:
        table += f"\n\n({others} job folder(s) from earlier sweeps in {sweep_dir} are not part of this sweep)"
    atomic_write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir}\n\n{table}\n")
    seeds = write_seed_summary(sweep_dir, jobs)
    return table if seeds is None else f"{table}\n\nOver calibration seeds (summary_seeds.md):\n{seeds}"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_seed_summary(sweep_dir: Path, jobs: list[tuple[str, dict, str]]) -> str | None:
    """``summary_seeds.csv`` / ``.md``: each recipe this sweep ran at two or more calibration seeds, with the
    mean and spread over them (``ptq4dm.experiment.over_seeds``). Without such a recipe, a seed table an earlier
    sweep left here is removed (it would describe other jobs). Returns the markdown (None if none)."""
    ok = [over_seeds.job(r) for _, r, status in jobs if status == "ok"]
    rows = over_seeds.over_seeds(ok)
    paths = sweep_dir / "summary_seeds.csv", sweep_dir / "summary_seeds.md"
    if not rows:
        for path in paths:
            path.unlink(missing_ok=True)
        return None
    columns = over_seeds.columns(rows)
    _write_csv(paths[0], rows, columns)
    table = markdown_table(rows, columns)
    atomic_write_text(paths[1], f"# Sweep {sweep_dir}: recipes over calibration seeds\n\nMean, sample standard "
                      f"deviation, the mean's standard error (sd / sqrt(n)) and the range over the seeds.\n\n"
                      f"{table}\n")
    return table


def failed_jobs(sweep_dir: str | Path) -> list[str]:
    """Jobs that neither finished nor stopped where asked (``stop_after``)."""
    return [name for name, _, status in _jobs(Path(sweep_dir))[0] if status not in ("ok", "stopped")]


class SweepSummary(Callback):
    """Hydra callback: give a multirun its id at the start; at the end, summarise its jobs and exit non-zero
    when any of them failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        start_sweep(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        table = write_summary(sweep_dir)
        if table:
            print(f"\nSweep summary ({sweep_dir}/summary.md):\n{table}")
        failed = failed_jobs(sweep_dir)
        if failed:
            print(f"\n{len(failed)} job(s) of this sweep failed: {failed} (errors in their {RESULTS} or "
                  f"{FAILURE}); exiting with status 1", file=sys.stderr)
            sys.exit(1)  # SystemExit passes through Hydra's callback guard, which only turns Exceptions into warnings
