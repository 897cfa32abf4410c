"""The same recipe over several calibration seeds: one row per recipe with the mean, the spread and the range.

Headline numbers are worth a claim only over calibration seeds (at W8A8 on small_cifar10 the seed moved FID over FP
more than any preset did), so a sweep that runs a recipe at several ``calib.seed`` / ``recon.method.seed`` values
gets this table beside its summary (``summary_seeds.md`` / ``.csv``) instead of means worked out by hand. Jobs are
one recipe when their overrides are equal once the seeds and the keys that change no number (logging, paths,
progress bars, the bootstrap's replicate count) are set aside.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from hydra.core.override_parser.overrides_parser import OverridesParser

# The calibration seeds: which samples the calibration set draws, and reconstruction's own draws.
SEED_KEYS = ("calib.seed", "recon.method.seed")
# Overrides that change no score: where things are written and read from, how they are logged and shown.
NOT_RECIPE = ("experiment", "force", "progress", "logger", "output_dir", "fp_cache_dir", "data.root",
              "metrics.inception_path", "metrics.fid_bootstrap")
# Per metric, the statistics shown: the headline one in full, the others' mean and spread.
METRICS = {"fid_over_fp": ("mean", "sd", "se", "min", "max"), "fid_vs_fp": ("mean", "sd"),
           "psnr_vs_fp": ("mean", "sd")}


@dataclass(frozen=True)
class Job:
    """What the table needs of one finished job: its overrides and its scores (None where not measured)."""

    overrides: tuple[str, ...]
    scores: dict


def job(record: dict) -> Job:
    """A finished job's record (its results.json, or a collected jobs.json entry) as the table reads it; FID over FP
    from the two FIDs for jobs older than its own key."""
    q, fp = record.get("quantized") or {}, record.get("fp") or {}
    over = q.get("fid_over_fp")
    if over is None and q.get("fid") is not None and fp.get("fid") is not None:
        over = q["fid"] - fp["fid"]
    return Job(tuple(record.get("overrides", [])),
               {"fid_over_fp": over, "fid_vs_fp": q.get("fid_vs_fp"), "psnr_vs_fp": q.get("psnr_vs_fp")})


def recipe_and_seeds(overrides: tuple[str, ...] | list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the overrides that make the recipe, the seed overrides), each as sorted ``key=value`` strings with
    Hydra's spelling of the values (``true`` and ``True`` are one recipe)."""
    recipe, seeds = [], []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element()
        if key.lstrip("+~") in NOT_RECIPE:
            continue
        (seeds if key.lstrip("+~") in SEED_KEYS else recipe).append(f"{key}={o.get_value_element_as_str()}")
    return tuple(sorted(recipe)), tuple(sorted(seeds))


def over_seeds(jobs: list[Job], min_seeds: int = 2) -> list[dict]:
    """One row per recipe run at ``min_seeds`` or more seed settings: n, the seeds, and per metric the mean, the
    sample standard deviation, the mean's standard error (sd / sqrt(n)) and the range."""
    groups: dict[tuple[str, ...], list[tuple[tuple[str, ...], dict]]] = {}
    for job in jobs:
        recipe, seeds = recipe_and_seeds(job.overrides)
        groups.setdefault(recipe, []).append((seeds, job.scores))
    rows = []
    for recipe, members in groups.items():
        if len(members) < min_seeds:
            continue
        row = {"recipe": " ".join(recipe) or "(defaults)", "n": len(members),
               "seeds": ", ".join(seed_label(s) for s, _ in members)}
        for metric, shown in METRICS.items():
            values = [s[metric] for _, s in members if s.get(metric) is not None]
            if len(values) < 2:
                continue
            sd = statistics.stdev(values)
            stats = {"mean": statistics.fmean(values), "sd": sd, "se": sd / math.sqrt(len(values)),
                     "min": min(values), "max": max(values)}
            row.update({f"{metric}_{k}": stats[k] for k in shown})
        rows.append(row)
    return sorted(rows, key=lambda r: r["recipe"])


def seed_label(seeds: tuple[str, ...]) -> str:
    """``7`` when every seed key is 7, ``default`` without seed overrides, else the overrides themselves."""
    values = {s.split("=", 1)[1] for s in seeds}
    if not seeds:
        return "default"
    return values.pop() if len(values) == 1 else " ".join(seeds)


def columns(rows: list[dict]) -> list[str]:
    """The table's columns: recipe, n, seeds, then each metric's statistics that some row has."""
    stats = [f"{m}_{s}" for m, shown in METRICS.items() for s in shown]
    return ["recipe", "n", "seeds", *(c for c in stats if any(c in r for r in rows))]
