"""The same recipe over several calibration seeds: one row per recipe with the mean, the spread and the range.

Headline numbers are worth a claim only over calibration seeds (at W8A8 on small_cifar10 the seed moved FID over FP
more than any preset did), so a sweep that runs a recipe at several ``calib.seed`` / ``recon.method.seed`` values
gets this table beside its summary (``summary_seeds.md`` / ``.csv``) instead of means worked out by hand.

Jobs are one recipe when their overrides are equal once the seeds and the keys that change no number (logging,
paths, progress bars, the bootstrap's replicate count) are set aside; values are compared as Hydra parses them
(``true`` = ``True``, ``'a'`` = ``a``, ``+k=1`` = ``k=1``). An override that repeats a default still makes another
recipe (the table sees overrides, not the composed config). The seeds are the ones each job ran with
(``results.json``'s ``calibration_seeds``, resolved, interpolations included); for jobs older than that key, the seed
overrides, "default" where there are none. A seed setting run more than once counts once, at the mean of its runs.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

# The calibration seeds: which samples the calibration set draws, and reconstruction's own draws.
SEED_KEYS = ("calib.seed", "recon.method.seed")
# Overrides that change no score: where things are written and read from, how they are logged and shown.
NOT_RECIPE = ("force", "progress", "stop_after", "logger", "output_dir", "fp_cache_dir", "data.root",
              "metrics.inception_path", "metrics.fid_bootstrap")
# Per metric, the statistics shown: the headline one in full, the others' mean and spread.
METRICS = {"fid_over_fp": ("mean", "sd", "se", "min", "max"), "fid_vs_fp": ("mean", "sd"),
           "psnr_vs_fp": ("mean", "sd")}


@dataclass(frozen=True)
class Job:
    """What the table needs of one finished job: its recipe, its seeds (``key=value`` strings) and its scores
    (None where not measured)."""

    recipe: tuple[str, ...]
    seeds: tuple[str, ...]
    scores: dict


def job(record: dict) -> Job:
    """A finished job's record (its results.json, or a collected jobs.json entry) as the table reads it; FID over FP
    from the two FIDs for jobs older than its own key."""
    recipe, seed_overrides = recipe_and_seeds(record.get("overrides", []))
    resolved = record.get("calibration_seeds")
    seeds = tuple(f"{k}={resolved[k]}" for k in SEED_KEYS if resolved.get(k) is not None) if resolved \
        else seed_overrides
    q = record.get("quantized") or {}
    return Job(recipe, seeds, {"fid_over_fp": fid_over_fp(record), "fid_over_fp_se": q.get("fid_over_fp_se"),
                               "fid_vs_fp": q.get("fid_vs_fp"), "psnr_vs_fp": q.get("psnr_vs_fp")})


def fid_over_fp(record: dict) -> float | None:
    """A job record's FID over FP: its own key, or for jobs older than that key the difference of the two FIDs."""
    q, fp = record.get("quantized") or {}, record.get("fp") or {}
    over = q.get("fid_over_fp")
    if over is None and q.get("fid") is not None and fp.get("fid") is not None:
        over = q["fid"] - fp["fid"]
    return over


def recipe_and_seeds(overrides: tuple[str, ...] | list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the overrides that make the recipe, the seed overrides), each as sorted ``key=value`` strings in one
    spelling per value; an override Hydra cannot parse is kept as written."""
    recipe, seeds = [], []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([text])
            key = o.get_key_element().lstrip("+")
            value = o.value()  # parsed: a string as written, anything else in one JSON spelling
            value = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        except (HydraException, ValueError):
            key, _, value = text.partition("=")
            key = key.lstrip("+")
        if key.lstrip("~") in NOT_RECIPE:
            continue
        (seeds if key in SEED_KEYS else recipe).append(f"{key}={value}")
    return tuple(sorted(recipe)), tuple(sorted(seeds))


def grouped(jobs: list[Job]) -> dict[tuple[str, ...], dict[tuple[str, ...], list[dict]]]:
    """recipe -> seed setting (in natural order) -> the scores of each run at it."""
    groups: dict[tuple[str, ...], dict[tuple[str, ...], list[dict]]] = {}
    for j in jobs:
        groups.setdefault(j.recipe, {}).setdefault(j.seeds, []).append(j.scores)
    return {recipe: {s: by_seed[s] for s in sorted(by_seed, key=natural_key)} for recipe, by_seed in groups.items()}


def per_seed(by_seed: dict[tuple[str, ...], list[dict]], metric: str) -> dict[tuple[str, ...], float]:
    """One value of ``metric`` per seed setting: the mean of its runs' finite scores (settings without any left
    out)."""
    out = {}
    for s, scores in by_seed.items():
        runs = [r[metric] for r in scores if r.get(metric) is not None and math.isfinite(r[metric])]
        if runs:
            out[s] = statistics.fmean(runs)
    return out


def over_seeds(jobs: list[Job], min_seeds: int = 2) -> list[dict]:
    """One row per recipe run at ``min_seeds`` or more seed settings: n (seed settings), the seeds, and per
    metric the mean, the sample standard deviation, the mean's standard error (sd / sqrt(n)) and the range. Scores
    that are missing or not finite are left out of their metric."""
    rows = []
    for recipe, by_seed in grouped(jobs).items():
        if len(by_seed) < min_seeds:
            continue
        row = {"recipe": recipe_label(recipe), "n": len(by_seed),
               "seeds": ", ".join(seed_label(s) + (f" (x{len(runs)})" if len(runs) > 1 else "")
                                  for s, runs in by_seed.items())}
        for metric, shown in METRICS.items():
            values = list(per_seed(by_seed, metric).values())
            if len(values) < 2:
                continue
            sd = statistics.stdev(values)
            stats = {"mean": statistics.fmean(values), "sd": sd, "se": sd / math.sqrt(len(values)),
                     "min": min(values), "max": max(values)}
            row.update({f"{metric}_{k}": stats[k] for k in shown})
        rows.append(row)
    return sorted(rows, key=lambda r: natural_key((r["recipe"],)))


def recipe_label(recipe: tuple[str, ...]) -> str:
    """A recipe as the table's ``recipe`` column names it."""
    return " ".join(recipe) or "(defaults)"


def seed_label(seeds: tuple[str, ...]) -> str:
    """``7`` when every seed key present is 7, ``default`` without any, else the ``key=value`` pairs."""
    if not seeds:
        return "default"
    values = {s.split("=", 1)[1] for s in seeds}
    return values.pop() if len(values) == 1 and len(seeds) == len(SEED_KEYS) else " ".join(seeds)


def natural_key(parts: tuple[str, ...]) -> list[tuple]:
    """A sort key that orders numbers by value (iters=5000 before iters=10000); per part, text and numbers
    alternate, so like compares with like."""
    return [tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)) for p in parts]


def columns(rows: list[dict]) -> list[str]:
    """The table's columns: recipe, n, seeds, then each metric's statistics that some row has."""
    stats = [f"{m}_{s}" for m, shown in METRICS.items() for s in shown]
    return ["recipe", "n", "seeds", *(c for c in stats if any(c in r for r in rows))]
