"""What reconstruction costs and what it buys, without the FID network (which a GPU session may not have yet).

quality   small_cifar10, W4A8 (and W8A8 when asked), NDTC calibration (1024 samples, DDIM 100, bf16 on a GPU), each
          recon preset through ptq4dm.quantize (the calibration engine every job uses): reconstruction wall time,
          the summed per-unit output error before and after, and the images' distance to full precision
          (PSNR, same seeds, DDIM 100) and the noise prediction's relative error on held-out trajectory inputs.
          Optionally with other weight ranges (--weight-metric), SmoothQuant's balance and the shortcut split.
graphs    the same reconstruction with and without CUDA graphs (recon.method.cuda_graphs): wall time, each unit's
          error after, and how many learned rounding decisions agree (BRECQ: all of them; QDrop draws its random
          drops from the graph's own RNG offsets, so its decisions may differ a little).
scaling   reconstruction wall time of BRECQ against iterations and against model size (tiny, small, and a
          ddpm_cifar10-sized UNet with random weights), 256 calibration samples: how it grows.

Each finished measurement is written at once to --out (JSON, one key per measurement), so a run killed at a
call's limit resumes where it stopped.

    python experiments/reconstruction/recon_benchmark.py --out recon.json quality --bits w4a8 --recon none brecq
    python experiments/reconstruction/recon_benchmark.py --out recon.json quality --recon qdrop --weight-metric mse --balance --split
    python experiments/reconstruction/recon_benchmark.py --out recon.json quality --recon qdiffusion --balance --split
    python experiments/reconstruction/recon_benchmark.py --out recon.json scaling --iters 100 400
    python experiments/reconstruction/recon_benchmark.py --out recon.json graphs --iters 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ptq4dm
from omegaconf import OmegaConf

from ptq4dm.calibration import CalibrationRecipe, ChannelBalance, Gaussian, RangeMetric, RangeSearch, Trajectory
from ptq4dm.diffusion import seeded_generators
from ptq4dm.experiment.provenance import provenance
from ptq4dm.models import build_unet, load_diffusion_model
from ptq4dm.models import DiffusionModel, build_noise_scheduler
from ptq4dm.quant.api import quantizers
from ptq4dm.reconstruction import BlockReconstruction, LayerReconstruction, QDropReconstruction, Reconstruction
from ptq4dm.utils.io import atomic_write_json
from ptq4dm.utils.precision import denoiser
from ptq4dm.utils.targets import build_typed

BITS = {"w4a8": (4, 8), "w8a8": (8, 8), "w4a4": (4, 4)}
CONF = Path(__file__).resolve().parents[2] / "conf"


def preset(group: str, name: str, key: str, kind: type, changes: dict | None = None):
    """What the config group's preset builds (conf/<group>/<name>.yaml, its ``key`` node), as a job would, with
    ``changes`` (dotted keys under ``key``) applied first."""
    node = OmegaConf.load(CONF / group / f"{name}.yaml")[key]
    for dotted, value in (changes or {}).items():
        OmegaConf.update(node, dotted, value)
    return build_typed(node, f"{group}/{name}.{key}", kind)


def qdiffusion(iters: int, batch_size: int = 32) -> Reconstruction:
    """recon=qdiffusion as its preset builds it, with ``iters`` and ``batch_size`` for each of its two stages."""
    return preset("recon", "qdiffusion", "method", Reconstruction,
                  {f"{stage}.{k}": v for stage in ("weights", "activations")
                   for k, v in (("iters", iters), ("batch_size", batch_size))})


RECON = {"none": None, "adaround": LayerReconstruction, "brecq": BlockReconstruction, "qdrop": QDropReconstruction,
         "qdiffusion": qdiffusion}  # qdiffusion: --iters steps in each stage
WEIGHT_METRICS = sorted(p.stem for p in (CONF / "weight_metric").glob("*.yaml"))
SIZES = {"tiny": ((32, 64, 64, 64), 8), "small": ((64, 128, 128, 128), 16), "ddpm_cifar10": ((128, 256, 256, 256), 32)}


def load(out: Path) -> dict:
    return json.loads(out.read_text()) if out.exists() else {}


def save(out: Path, key: str, value: dict) -> None:
    results = load(out)
    results[key] = value
    atomic_write_json(out, results)
    print(key, json.dumps(value)[:400], flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def sample(network, sampler, n: int, device, precision: str, batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, n, batch):
        idx = list(range(s, min(s + batch, n)))
        gens = seeded_generators(0, idx)
        noise = sampler.initial_noise(gens, (3, 32, 32), device)
        out.append(sampler.sample(denoiser(network, precision), noise, gens).float().cpu())
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of uint8-rounded images, as the jobs' psnr_vs_fp."""
    a, b = (((x + 1) * 127.5).round().clamp(0, 255) / 255 for x in (a, b))
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def noise_error(fp, q, x, t, precision) -> float:
    """Relative error of the predicted noise, ||eps_q - eps_fp|| / ||eps_fp||, over held-out inputs."""
    a, b = denoiser(fp, precision)(x, t), denoiser(q, precision)(x, t)
    return float((b - a).norm() / a.norm())


def quality(args, device) -> None:
    model = load_diffusion_model("small_cifar10")
    model.unet.to(device)
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=100)
    calibration = CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=args.calib_samples,
                                    batch_size=256, seed=args.seed)
    fp_images = sample(model.unet, sampler, args.images, device, args.precision)
    held = CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=128, seed=99).build(
        denoiser(model.unet, args.precision), sampler, (3, 32, 32), device, progress=False)
    hx, ht = held.x.to(device), held.t.to(device)
    # The recipe beyond the preset, named in the key only where it differs from the defaults (so that earlier
    # results keep their keys): weight ranges, SmoothQuant's balance, Q-Diffusion's shortcut split.
    search = RangeSearch(weight_metric=preset("weight_metric", args.weight_metric, "fn", RangeMetric))
    balance = preset("balance", "smoothquant", "method", ChannelBalance) if args.balance else None
    variant = "".join(f"/{part}" for part, on in ((f"weights-{args.weight_metric}", args.weight_metric != "auto"),
                                                  ("balance", args.balance), ("split", args.split)) if on)
    for bits in args.bits:
        w, a = BITS[bits]
        for name in args.recon:
            key = f"quality/{bits}/{name}/iters{args.iters}/bs{args.batch_size}/seed{args.seed}" + variant
            if key in load(args.out):
                continue
            method = None if RECON[name] is None else RECON[name](iters=args.iters, batch_size=args.batch_size)
            sync()
            t0 = time.perf_counter()
            config = ptq4dm.QuantConfig(weight_bits=w, act_bits=a, shortcut_split=args.split)
            qnet, report = ptq4dm.quantize(model.unet, model.scheduler, config, calibration=calibration,
                                           search=search, sampler=sampler, reconstruction=method,
                                           precision=args.precision, balance=balance)
            sync()
            seconds = time.perf_counter() - t0
            images = sample(qnet, sampler, args.images, device, args.precision)
            units = report.reconstruction
            save(args.out, key, {
                "bits": bits, "recon": name, "iters": args.iters if method else 0, "batch_size": args.batch_size,
                "weight_metric": args.weight_metric, "balance": args.balance, "shortcut_split": args.split,
                "calibration_samples": args.calib_samples, "images": args.images, "calibration_seed": args.seed,
                "quantize_seconds": seconds, "timings": report.timings,
                "units": len(units), "loss_before": sum(u.loss_before for u in units),
                "loss_after": sum(u.loss_after for u in units),
                "units_improved": sum(u.loss_after < u.loss_before for u in units),
                "per_unit": [u.__dict__ for u in units],
                "psnr_vs_fp": psnr(images, fp_images), "noise_error": noise_error(model.unet, qnet, hx, ht,
                                                                                  args.precision)})
            del qnet


def graphs(args, device) -> None:
    model = load_diffusion_model("small_cifar10")
    model.unet.to(device)
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=100)
    calibration = CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=256, batch_size=256, seed=1234)
    for name in args.recon:
        runs = {}
        for cuda_graphs in (True, False):
            sync()
            t0 = time.perf_counter()
            qnet, report = ptq4dm.quantize(model.unet, model.scheduler, ptq4dm.QuantConfig(weight_bits=4, act_bits=8),
                                           calibration=calibration, search=RangeSearch(), sampler=sampler,
                                           reconstruction=RECON[name](iters=args.iters, cuda_graphs=cuda_graphs),
                                           precision=args.precision)
            sync()
            rounding = {k: q.rounding.cpu() for k, q in quantizers(qnet).items() if q.rounding.numel()}
            runs[cuda_graphs] = (report, time.perf_counter() - t0, rounding)
            del qnet
        (rg, tg, dg), (re, te, de) = runs[True], runs[False]
        same = sum(int((dg[k] == de[k]).sum()) for k in dg)
        total = sum(v.numel() for v in dg.values())
        save(args.out, f"graphs/w4a8/{name}/iters{args.iters}", {
            "iters": args.iters, "units": len(rg.reconstruction), "calibration_samples": 256,
            "reconstruction_seconds": {"graphs": rg.timings["reconstruction_seconds"],
                                       "eager": re.timings["reconstruction_seconds"]},
            "quantize_seconds": {"graphs": tg, "eager": te},
            "loss_after": {"graphs": sum(u.loss_after for u in rg.reconstruction),
                           "eager": sum(u.loss_after for u in re.reconstruction)},
            "max_unit_loss_after_rel_diff": max(abs(a.loss_after - b.loss_after) / max(b.loss_after, 1e-12)
                                                for a, b in zip(rg.reconstruction, re.reconstruction)),
            "rounding_decisions_equal": same, "rounding_decisions": total})


def scaling(args, device) -> None:
    scheduler = build_noise_scheduler()
    sampler = ptq4dm.Sampler(scheduler, "ddim", steps=100)
    for size in args.sizes:
        channels, groups = SIZES[size]
        torch.manual_seed(0)
        model = DiffusionModel(build_unet(channels, groups), scheduler, size)
        model.unet.to(device).eval().requires_grad_(False)
        params = sum(p.numel() for p in model.unet.parameters())
        for iters in args.iters_list:
            key = f"scaling/{size}/iters{iters}"
            if key in load(args.out):
                continue
            sync()
            t0 = time.perf_counter()
            _, report = ptq4dm.quantize(model.unet, scheduler, ptq4dm.QuantConfig(weight_bits=4, act_bits=8),
                                        calibration=CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(),
                                                                      num_samples=256),
                                        sampler=sampler, reconstruction=BlockReconstruction(iters=iters),
                                        precision=args.precision)
            sync()
            save(args.out, key, {"model": size, "parameters": params, "iters": iters,
                                 "reconstruction_seconds": report.timings.get("reconstruction_seconds"),
                                 "total_seconds": time.perf_counter() - t0, "units": len(report.reconstruction),
                                 "unit_seconds": {u.unit: u.seconds for u in report.reconstruction}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precision", default="bf16")
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--bits", nargs="+", default=["w4a8"], choices=sorted(BITS))
    q.add_argument("--recon", nargs="+", default=["none", "adaround", "brecq", "qdrop"], choices=list(RECON))
    q.add_argument("--iters", type=int, default=2000)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--images", type=int, default=512)
    q.add_argument("--calib-samples", type=int, default=1024)
    q.add_argument("--seed", type=int, default=1234, help="calibration seed")
    q.add_argument("--weight-metric", default="auto", choices=WEIGHT_METRICS,
                   help="weight ranges: a weight_metric/ preset (auto: min/max below 8 bits; mse: the Lp search)")
    q.add_argument("--balance", action="store_true", help="balance=smoothquant (SmoothQuant's channel balance)")
    q.add_argument("--split", action="store_true", help="ops.shortcut_split=true")
    s = sub.add_parser("scaling")
    s.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    s.add_argument("--iters", dest="iters_list", type=int, nargs="+", default=[100, 400])
    g = sub.add_parser("graphs")
    g.add_argument("--recon", nargs="+", default=["brecq", "qdrop"], choices=["adaround", "brecq", "qdrop"])
    g.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    results = load(args.out)
    results.setdefault("provenance", provenance(device))
    atomic_write_json(args.out, results)
    {"quality": quality, "scaling": scaling, "graphs": graphs}[args.what](args, device)


if __name__ == "__main__":
    main()
