"""Contrast of the committed 10k jobs' sample grids against the FP grid from the same noise (no GPU needed).

Each job folder's ``*samples_quantized.png`` holds its first 64 images (8 x 8 tiles of 32 x 32, 1 pixel of
padding, ``ptq4dm/utils/images.py``); the FP grid of the same 64 seeds is ``*samples_full_precision.png``. Per job:
the median over images of the per-image pixel std ratio (quantized / FP), the fraction of saturated values (0 or
255; FP's in the header) and the mean shift in 8-bit levels. FID over FP for the same job beside it, from
``jobs.json``.

    python experiments/paper/grid_contrast.py > experiments/results/grid_contrast.txt
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parents[1] / "results"
FOLDERS = ("main_10k", "main_10k_recon")
TILE, PAD, N = 32, 1, 8


def tiles(path: Path) -> np.ndarray:
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    starts = [PAD + i * (TILE + PAD) for i in range(N)]
    return np.stack([grid[r:r + TILE, c:c + TILE] for r in starts for c in starts])  # (64, 32, 32, 3)


def fid_over_fp(folder: Path) -> dict[str, float]:
    jobs = json.loads((folder / "jobs.json").read_text())
    return {j["job"]: j["quantized"]["fid"] - j["fp"]["fid"] for j in jobs if j.get("quantized")}


def precision(name: str) -> str:
    """The simulation precision a grid's job name overrides ("eval.precision=fp32"), or "" for the default."""
    return next((part for part in name.removesuffix(".png").split("__")[0].split(",")
                 if part.startswith("eval.precision=")), "")


def main() -> None:
    print("| folder | job | per-image std ratio (median) | saturated values | mean shift (levels) | FID over FP |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in FOLDERS:
        folder = RESULTS / name
        fp_grids = {precision(p.name): tiles(p) for p in folder.glob("*samples_full_precision.png")}
        fids = fid_over_fp(folder)
        for key, fp in sorted(fp_grids.items()):
            label = "full precision" + (f", {key}" if key else "")
            print(f"| {name} | {label} | 1 | {np.mean((fp == 0) | (fp == 255)):.4f} | 0 | |")
        for path in sorted(folder.glob("*__samples_quantized.png")):
            job = path.name.removesuffix("__samples_quantized.png")
            fp = fp_grids[precision(job)]  # the FP images simulated as this job's were
            fp_std = fp.reshape(len(fp), -1).std(1)
            q = tiles(path)
            ratio = np.median(q.reshape(len(q), -1).std(1) / fp_std)
            fid = fids.get(job)
            print(f"| {name} | {job} | {ratio:.3f} | {np.mean((q == 0) | (q == 255)):.4f} | "
                  f"{(q - fp).mean():+.2f} | {'' if fid is None else f'{fid:+.2f}'} |")


if __name__ == "__main__":
    main()
