"""kill -9 a sweep in each of its stages, run the same command again, and check what a researcher relies on.

For each stage (FP sampling, calibration, quantized sampling, scoring) a two-job sweep
(``calib=gaussian_ts,uniform_ts``, tiny model, CPU-sized) is started with an empty FP cache, killed with SIGKILL
(its whole process group) a random moment after the stage began, and then started again with the same command
until it finishes. Checked after the second run:

  * every job that had finished before the kill is byte for byte what it was (every file it wrote; Hydra's own
    .hydra/ folder and log are Hydra's and are rewritten by it);
  * every job's scores equal those of the same sweep run without interruption (so nothing stale or mixed was
    scored, and unfinished jobs were computed again or resumed with their own saved calibration);
  * the sweep summary lists exactly the sweep's two jobs, both ok.

    python experiments/robustness/kill_and_resume.py --out experiments/results/kill_and_resume_cpu.md

FP sampling is killed in the first job (nothing finished yet; the FP cache is half written); the other stages
in the second job, so that the first job is finished and must stay intact.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("fp_samples", "calibration", "quantized_samples", "scoring")
SWEEP = ["calib=gaussian_ts,uniform_ts", "sampler.steps=5", "eval.num_samples=16", "eval.batch_size=4",
         "calib.num_samples=8", "calib.batch_size=8", "metric.num_candidates=20", "metric.max_values=4096",
         "metrics.kid_subset_size=4", "progress=false", "logger=none"]
SCORES = ("fid", "sfid", "fid_vs_fp", "psnr_vs_fp", "mse_vs_fp")


def command(sweep: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "ptq4dm.run", "-m", *SWEEP, f"hydra.sweep.dir={sweep}", f"fp_cache_dir={cache}"]


def job_files(folder: Path) -> dict[str, bytes]:
    """Every file a job wrote (Hydra's .hydra/ and log excluded)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


def finished(sweep: Path) -> list[str]:
    out = []
    for p in sorted(sweep.glob("*/results.json")):
        try:
            if json.loads(p.read_text()).get("status") == "ok":
                out.append(p.parent.name)
        except ValueError:
            pass
    return out


def scores(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: {k: json.loads(p.read_text())["quantized"][k] for k in SCORES} |
            {f"fp_{k}": json.loads(p.read_text())["fp"][k] for k in ("fid", "sfid")}
            for p in sorted(sweep.glob("*/results.json"))}


def run_to_end(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def kill_during(cmd: list[str], stage: str, job: int, delay: float, timeout: float) -> str:
    """Start ``cmd``; SIGKILL its process group ``delay`` seconds after job ``job`` (0-based) logs the start of
    ``stage``. Returns the output up to the kill."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen, starts, deadline = [], 0, time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if f"stage {stage} ..." in line:
            starts += 1
            if starts == job + 1:
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                break
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    if starts < job + 1:
        raise RuntimeError(f"the sweep never reached stage {stage} of job {job}:\n{''.join(seen)[-3000:]}")
    return "".join(seen)


def scenario(stage: str, root: Path, reference: dict, seed: int, timeout: float) -> dict:
    sweep, cache = root / f"sweep_{stage}", root / f"fp_{stage}"
    cmd = command(sweep, cache)
    job = 0 if stage == "fp_samples" else 1
    delay = random.Random(seed).uniform(0.0, 1.5)
    kill_during(cmd, stage, job, delay, timeout)
    done_at_kill = finished(sweep)
    before = {name: job_files(sweep / name) for name in done_at_kill}
    left = sorted(str(p.relative_to(sweep)) for p in sweep.rglob("*") if p.is_file() and ".hydra" not in p.parts
                  and p.suffix != ".log" and p.parent.name not in done_at_kill and not p.name.startswith("."))
    again = run_to_end(cmd, timeout)
    intact = all(job_files(sweep / name) == files for name, files in before.items())
    got = scores(sweep)
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    summary_ok = sorted((r["job"], r["status"]) for r in rows) == [("0", "ok"), ("1", "ok")]
    resumed = {name: json.loads((sweep / name / "results.json").read_text())["calibration_restored"]
               for name in got}
    return {"stage": stage, "job killed": job, "seconds after stage start": round(delay, 2),
            "finished at kill": done_at_kill, "left by the killed job": len(left),
            "calibration restored": resumed, "rerun exit": again.returncode,
            "finished jobs intact": intact, "scores equal uninterrupted": got == reference,
            "summary: two jobs ok": summary_ok,
            "ok": again.returncode == 0 and intact and got == reference and summary_ok}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kill_and_resume_"))
    ref = run_to_end(command(root / "reference", root / "fp_reference"), args.timeout)
    if ref.returncode != 0:
        raise RuntimeError(f"the uninterrupted sweep failed:\n{ref.stderr[-3000:]}")
    reference = scores(root / "reference")
    rows = [scenario(stage, root, reference, args.seed + i, args.timeout) for i, stage in enumerate(args.stages)]
    columns = list(rows[0])
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] +
                      ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows])
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# kill -9 during each stage of a sweep, then the same command again\n\n"
                            f"`python experiments/robustness/kill_and_resume.py --seed {args.seed}"
                            f"{' --stages ' + ' '.join(args.stages) if args.stages != list(STAGES) else ''}`"
                            f" (sweep: `{' '.join(SWEEP)}`)\n\n{table}\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main()) else 1)
