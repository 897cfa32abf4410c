"""The README's result tables, in markdown, from the committed results (experiments/results/*/jobs.json), beside
the paper's figures (PTQ4DM, CVPR 2023; ../shared/docs/paper.md) as changes relative to full precision.

    python experiments/paper/tables.py                                   # experiments/results
    python experiments/paper/tables.py experiments/results/x_t_quantized  # another results folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ptq4dm.experiment import over_seeds
from ptq4dm.experiment.results import load_all
from ptq4dm.utils.table import markdown_table

RESULTS = Path(__file__).resolve().parents[1] / "results"
BITS = ("w8a8", "w4a8")

# The paper's FIDs (10k samples). Tables 1-4: ImageNet 64x64, DDIM 250, FP 21.63. Table 5: CIFAR-10.
PAPER = {
    "table1_outputs": {"fp": 21.63, "ptq4dm": None, "table1_mean": 21.38, "table1_variance": 21.96,
                       "table1_x_prev": 21.94, "table1_all": 21.99},
    "table2_calib_source": {"fp": 21.63, "gaussian_ts": 33.15, "forward_ts": 34.55, "raw": 128.63},
    "table3_timesteps": {"fp": 21.63, "single_ts": 49.37, "uniform_ts": 26.19, "gaussian_ts": 24.26},
    "table4_metric": {"fp": 21.63, "l1": 100.52, "cosine": 34.81, "kl": 47.27, "mse": 30.46},
}
PAPER_TABLE5 = {"ddim-100": (10.05, 14.18), "ddim-250": (8.91, 11.66), "ddpm-1000": (7.14, 7.10)}  # DDPM: 4000 steps

AXIS = {"table1_outputs": "ops", "table2_calib_source": "calib", "table3_timesteps": "calib",
        "table4_metric": "metric", "table5_samplers": "sampler"}
COMMAND = "python -m ptq4dm.run -m experiment={name} bits={bits}"


def _delta(value: float | None, fp: float | None) -> str:
    if value is None or fp is None:
        return "n/a"
    return f"{value:.2f} ({value - fp:+.2f})"


def _rank(values: dict[str, float]) -> dict[str, int]:
    order = sorted(values, key=values.get)
    return {k: order.index(k) + 1 for k in values}


def ablation_table(name: str, rows: list[dict]) -> str:
    axis, paper = AXIS[name], PAPER.get(name, {})
    by_bits = {b: {r[axis]: r for r in rows if r["bits"] == b} for b in BITS}
    choices = [c for c in paper if c != "fp"] or sorted({r[axis] for r in rows})
    paper_rank = _rank({c: paper[c] for c in choices if paper.get(c) is not None})
    ranks = {b: _rank({c: r["fid"] for c, r in by_bits[b].items()}) for b in BITS}
    out = []
    for c in choices:
        row = {axis: c, "paper FID (vs FP)": _delta(paper.get(c), paper.get("fp")),
               "paper rank": paper_rank.get(c, "")}
        for b in BITS:
            r = by_bits[b].get(c)
            row[f"{b.upper()} FID (vs FP)"] = _delta(r["fid"], r["fp_fid"]) if r else "not run"
            row[f"{b.upper()} rank"] = ranks[b].get(c, "")
            row[f"{b.upper()} FID to FP images"] = f"{r['fid_vs_fp']:.2f}" if r else ""
        out.append(row)
    n = sorted({r["num_samples"] for r in rows})
    head = (f"`{COMMAND.format(name=name, bits='w8a8')}` and `bits=w4a8`; {', '.join(map(str, n))} samples per FID "
            f"(ours), 10k (paper). Rank 1 = lowest FID.")
    return f"{head}\n\n{markdown_table(out, list(out[0]))}"


def table5(rows: list[dict]) -> str:
    out = []
    for sampler, (paper_fp, paper_q) in PAPER_TABLE5.items():
        row = {"sampler": sampler, "paper FP -> W8A8": f"{paper_fp:.2f} -> {paper_q:.2f} ({paper_q - paper_fp:+.2f})"}
        for b in BITS:
            r = next((r for r in rows if r["sampler"] == sampler and r["bits"] == b), None)
            row["ours FP"] = row.get("ours FP") or (f"{r['fp_fid']:.2f}" if r else "")
            row[f"ours {b.upper()} (vs FP)"] = _delta(r["fid"], r["fp_fid"]) if r else "not run"
        out.append(row)
    n = sorted({r["num_samples"] for r in rows})
    return (f"`{COMMAND.format(name='table5_samplers', bits='w8a8')}` and `bits=w4a8`; {', '.join(map(str, n))} "
            f"samples per FID (ours); paper: CIFAR-10 improved-diffusion model, 10k samples, DDPM with 4000 steps "
            f"(ours 1000).\n\n{markdown_table(out, list(out[0]))}")


def single_t(rows: list[dict]) -> str:
    ts = sorted({r["calib.timesteps.t"] for r in rows}, key=float)
    out = []
    for b in BITS:
        got = {r["calib.timesteps.t"]: r for r in rows if r["bits"] == b}
        if got:
            out.append({"bits": b.upper(), **{f"t = {t} T": f"{got[t]['fid']:.2f}" if t in got else "" for t in ts}})
    return (f"`{COMMAND.format(name='figure4_single_t', bits='w8a8')}` and `bits=w4a8`; "
            f"{rows[0]['num_samples']} samples per FID; FP {rows[0]['fp_fid']:.2f}.\n\n"
            f"{markdown_table(out, list(out[0]))}")


def ndtc_grid(rows: list[dict]) -> str:
    """FID (and FID to the FP images) over NDTC's mean and spread, one row per bit-width and spread."""
    means = sorted({r["calib.timesteps.mean"] for r in rows}, key=float)
    out = []
    for b in BITS:
        for std in sorted({r["calib.timesteps.std"] for r in rows if r["bits"] == b}, key=float):
            got = {r["calib.timesteps.mean"]: r for r in rows if r["bits"] == b and r["calib.timesteps.std"] == std}
            out.append({"bits": b.upper(), "std / T": std,
                        **{f"mean {m} T": f"{got[m]['fid']:.2f} ({got[m]['fid_vs_fp']:.2f})" if m in got else ""
                           for m in means}})
    head = (f"`{COMMAND.format(name='table3_ndtc_grid', bits='w8a8')}` and `bits=w4a8`; {rows[0]['num_samples']} "
            f"samples per FID; FP {rows[0]['fp_fid']:.2f}. FID (FID to FP images).")
    return f"{head}\n\n{markdown_table(out, list(out[0]))}"


def main_table(rows: list[dict]) -> str:
    """FP (one row per simulation precision: each samples its own FP images), then one row per quantized job,
    labelled by its bits and every departure from main_10k's method (presets and single keys), seeds last."""
    fps = {r.get("eval.precision", ""): r for r in rows}
    out = [{"model": "full precision" + (f", eval.precision={p}" if p else ""), "FID": fp["fp_fid"],
            "sFID": fp["fp_sfid"], "FID to FP images": "", "PSNR to FP (dB)": "", "calibration (s)": ""}
           for p, fp in sorted(fps.items())]
    for r in sorted(rows, key=_order):
        label = ", ".join([f"PTQ4DM {r['bits'].upper()}", *_extra(r)])
        se = f" ± {r['fid_over_fp_se']:.2f}" if r.get("fid_over_fp_se") is not None else ""  # jobs since 9fd87fd
        out.append({"model": label, "FID": f"{r['fid']:.2f} ({r['fid'] - r['fp_fid']:+.2f}{se})", "sFID": r["sfid"],
                    "FID to FP images": r["fid_vs_fp"], "PSNR to FP (dB)": r["psnr_vs_fp"],
                    "calibration (s)": r.get("calibration_seconds")})
    fp = rows[0]
    head = (f"`python -m ptq4dm.run -m experiment=main_10k` (plus the overrides named in the rows); small_cifar10, "
            f"DDIM 100, {fp['num_samples']} samples per FID against the CIFAR-10 train set, 1024 calibration "
            f"samples, NDTC (gaussian_ts) and MSE (Lp 2.4) unless the row says otherwise. FID (over FP, ± its standard "
            "error over the evaluation images where the job has one); each row against the FP images simulated "
            "at its own precision.")
    return f"{head}\n\n{markdown_table(out, list(out[0]))}"


# main_10k's method: a row names the presets it changes and every single key it sets (seeds last).
DEFAULTS = {"model": "small_cifar10", "sampler": "ddim-100", "ops": "ptq4dm", "calib": "gaussian_ts", "metric": "mse",
            "weight_metric": "auto", "balance": "none", "recon": "none"}
SEEDS = over_seeds.SEED_KEYS


def _order(row: dict) -> tuple:
    """Bits, then the recipe (simplest first), then its seeds: a recipe's seeds stand together."""
    recipe = [e for e in _extra(row) if e.split("=")[0] not in SEEDS]
    seeds = [int(row[k]) if str(row[k]).isdigit() else 0 for k in SEEDS if k in row]
    return BITS.index(row["bits"]) if row["bits"] in BITS else 9, len(recipe), over_seeds.natural_key(recipe), seeds


def _extra(row: dict) -> list[str]:
    """The row's departures from main_10k's method: other presets, then any ops/calib/metric/recon/balance/eval
    key, the calibration seeds last."""
    presets = [f"{k}={row[k]}" for k, default in DEFAULTS.items() if row.get(k) not in (None, "", default)]
    keys = [f"{k}={v}" for k, v in sorted(row.items()) if "." in k and k not in SEEDS
            and k.split(".")[0] in (*DEFAULTS, "bits", "eval")]
    return presets + keys + [f"{k}={row[k]}" for k in SEEDS if k in row]


def seeds_table(folder: Path) -> str:
    """The recipes of a results folder run at several calibration seeds: mean, spread and range of each."""
    records = [r for r in json.loads((folder / "jobs.json").read_text()) if r.get("status") == "ok"]
    rows = over_seeds.over_seeds([over_seeds.job(r) for r in records])
    if not rows:
        return ""
    return (f"Over calibration seeds ({folder.name}): mean, sample sd, the mean's standard error and range of FID "
            f"over FP; FID and PSNR to FP, mean and sd.\n\n{markdown_table(rows, over_seeds.columns(rows))}\n")


def main(root: Path = RESULTS) -> None:
    results = load_all(root)
    sections = [(f"Main result ({name})", name, main_table) for name in results if name.startswith("main_10k")]
    sections += [("Figure 4: one calibration time step", "figure4_single_t", single_t),
                 ("NDTC mean and spread", "table3_ndtc_grid", ndtc_grid),
                 ("Table 5: samplers", "table5_samplers", table5)]
    for title, name, fn in sections:
        if results.get(name):
            print(f"### {title}\n\n{fn(results[name])}\n")
        if name.startswith("main_10k") and results.get(name):
            print(seeds_table(root / name))
    for name in AXIS:
        if name != "table5_samplers" and results.get(name):
            print(f"### {name}\n\n{ablation_table(name, results[name])}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
