"""A PTQ job's folder: what is finished, what an interrupted run can resume, and what is kept aside.

A job is finished when its ``results.json`` says ``status: ok``; that file is written last, after every other
output. Finished results are never overwritten: a job computed again in the same folder (another config, a
code change, ``force=true``) first moves the earlier outputs to ``superseded/<time>/`` with the reason, and a
failed attempt beside a finished result writes ``failure.json`` and leaves the result alone.

An unfinished job (killed, or failed) resumes only what provably belongs to it: its calibration
(``quantization.safetensors``, ``calibration.json``) when the config, the code and the inputs are the same, and
the quantized image shards made with that very calibration (``samples/<calibration digest>/``). Anything else
an unfinished attempt left is deleted before the job starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from ptq4dm.experiment.provenance import differences
from ptq4dm.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

RESULTS, FAILURE, CALIBRATION = "results.json", "failure.json", "calibration.json"
SUPERSEDED = "superseded"
# What a job writes in its folder. Only these are ever moved aside or deleted: a folder may hold other files
# (hydra.run.dir pointing somewhere in use), and Hydra's .hydra/ and log file are Hydra's.
OUTPUTS = (RESULTS, FAILURE, CALIBRATION, "quantization.safetensors", "ranges.csv", "reconstruction.csv",
           "config.yaml", "samples",
           "samples_full_precision.png", "samples_quantized.png", "wandb", "csv")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def set_aside(folder: Path, outputs: list[Path], reason: str) -> Path | None:
    """Move ``outputs`` (files or folders in ``folder``) to ``folder/superseded/<UTC time>/`` with a REASON.txt:
    what an earlier run computed is kept, never replaced."""
    if not outputs:
        return None
    stamp = time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime())
    target, n = folder / SUPERSEDED / stamp, 1
    while target.exists():
        target, n = folder / SUPERSEDED / f"{stamp}-{n}", n + 1
    target.mkdir(parents=True)
    for p in outputs:
        p.rename(target / p.name)
    atomic_write_text(target / "REASON.txt", reason.rstrip() + "\n")
    log.warning("earlier outputs of %s moved to %s: %s", folder, target, reason.splitlines()[0])
    return target


class JobFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- finished results -------------------------------------------------------------------------------------
    def finished(self) -> dict | None:
        """The finished results in this folder, whatever config made them, or None."""
        results = _read_json(self.path / RESULTS)
        return results if results is not None and results.get("status") == "ok" else None

    @staticmethod
    def differences(results: dict, record: dict) -> list[str]:
        """How an earlier result's record (config digest, code, libraries, device, inputs) differs from now."""
        return differences(results.get("record") or {"record": "none (written before records existed)"}, record)

    def write_results(self, results: dict) -> None:
        """The job's last write: from here on it is finished. A failure of an earlier attempt goes away."""
        atomic_write_json(self.path / RESULTS, results)
        (self.path / FAILURE).unlink(missing_ok=True)

    def record_failure(self, failure: dict) -> Path:
        """``results.json`` when nothing is finished here, else ``failure.json`` beside the intact result."""
        path = self.path / (FAILURE if self.finished() else RESULTS)
        atomic_write_json(path, failure)
        return path

    def outputs(self) -> list[Path]:
        """The job outputs present here (``OUTPUTS``; nothing else in the folder is touched)."""
        return [self.path / name for name in OUTPUTS if (self.path / name).exists()]

    def set_aside(self, reason: str) -> Path | None:
        """Move every output to ``superseded/<UTC time>/`` (nothing is deleted) and say why there."""
        return set_aside(self.path, self.outputs(), reason)

    # -- resumable calibration --------------------------------------------------------------------------------
    def calibration(self, record: dict, checkpoint: str) -> dict | None:
        """The saved calibration of this job, if it was made under ``record`` and its checkpoint is intact."""
        saved = _read_json(self.path / CALIBRATION)
        path = self.path / checkpoint
        if saved is None or not path.is_file() or saved.get("record") != record:
            return None
        return saved if file_digest(path) == saved.get("checkpoint_sha256") else None

    def save_calibration(self, record: dict, checkpoint: str, details: dict) -> dict:
        """Record a just-saved calibration checkpoint: resumable from now on."""
        saved = {"record": record, "checkpoint_sha256": file_digest(self.path / checkpoint), **details}
        atomic_write_json(self.path / CALIBRATION, saved)
        return saved

    def quantized_samples_dir(self) -> Path:
        """Where this job's quantized image shards are (the folder of its saved calibration)."""
        saved = _read_json(self.path / CALIBRATION)
        if saved is None:
            raise FileNotFoundError(f"{self.path} holds no {CALIBRATION}: not a ptq4dm.run job folder")
        return self.samples_dir(saved)

    def samples_dir(self, calibration: dict) -> Path:
        """Quantized image shards of one calibration: a resumed job only adds to those of its own calibration."""
        return self.path / "samples" / calibration["checkpoint_sha256"][:16]

    def clear_unfinished(self, reason: str) -> None:
        """Clear what an unfinished attempt left: a saved calibration (minutes to hours of reconstruction) is set
        aside with ``reason``; without one nothing of value is here, and it is deleted."""
        if self.finished():
            raise RuntimeError(f"{self.path} holds a finished result: set it aside, never delete it")
        if (self.path / CALIBRATION).is_file():
            self.set_aside(f"an unfinished attempt's saved calibration, not resumed: {reason}")
            return
        for p in self.outputs():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def prune_samples(self, keep: Path) -> None:
        """Shards of other calibrations (an unfinished attempt's) cannot be mixed in: delete them."""
        root = self.path / "samples"
        for p in root.iterdir() if root.is_dir() else []:
            if p != keep:
                log.info("deleting shards of another calibration: %s", p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()
