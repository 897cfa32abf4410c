"""Which time steps does reconstruction spend its effort on? Each unit's output error, split by time step, on the CPU.

Reconstruction minimises each unit's output error summed over the calibration samples, so the samples whose error
is largest steer it. NDTC (Gaussian 0.4/0.4, truncated and clamped to the sampler's steps) piles about a sixth of
its samples on the last DDIM step (t = 0), where the noise prediction's relative error is largest
(`experiments/results/error_structure_cpu.txt`) and where it matters least for the image: the last DDIM step
turns x_t into x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) with a = alpha_bar_0 = 1 - beta_0, so an error d in its
noise prediction moves the image by sqrt(beta_0 / (1 - beta_0)) d, about 0.01 d. This script measures, for
small_cifar10 at W4A8 after the range search (nearest rounding, activations quantized: the error reconstruction
starts from), each unit's output error per calibration sample, with the unit's inputs from the FP network, and
reports the share of the summed error that each group of time steps carries, for NDTC and for Q-Diffusion's
uniform steps (`calib=uniform_ts`), beside the share of the samples.

    python experiments/reconstruction/loss_by_timestep.py > experiments/results/loss_by_timestep_cpu.txt

DDIM 100 as main_10k, fp32 (main_10k: bf16 autocast), 256 samples per calibration set (main_10k: 1024).
"""

from __future__ import annotations

import copy
import platform
import time

import torch

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, Gaussian, RangeSearch, Trajectory, Uniform
from ptq4dm.engine import PTQMethod, calibrate_network
from ptq4dm.models import load_diffusion_model
from ptq4dm.reconstruction import find_units
from ptq4dm.reconstruction.capture import capture
from ptq4dm.utils.precision import denoiser

SAMPLES = 256
SEED = 1234
STEPS = 100
GROUPS = [(0, 0), (1, 99), (100, 299), (300, 599), (600, 999)]  # time-step ranges, inclusive


def per_sample_error(q_unit, args, kwargs, target) -> torch.Tensor:
    with torch.no_grad():
        out = q_unit(*args, **kwargs)
    out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
    d = (out.float() - target.float()).pow(2)
    return d.sum(1).flatten(1).mean(1) if d.dim() > 2 else d.sum(1)  # the lp_loss of methods.py, per sample


def main() -> None:
    torch.set_num_threads(2)
    device = torch.device("cpu")
    model = load_diffusion_model("small_cifar10")
    unet = model.unet.eval()
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=STEPS)
    forward = lambda network: denoiser(network, "fp32")  # noqa: E731
    w4a8 = PTQMethod(ptq4dm.QuantConfig(weight_bits=4, act_bits=8), RangeSearch(), None, None)
    print(f"# small_cifar10 W4A8 after the range search (nearest rounding, activations quantized), DDIM {STEPS}, "
          f"{SAMPLES} calibration samples (seed {SEED}), unit inputs from FP; CPU {platform.machine()}, "
          f"torch {torch.__version__}")
    for name, timesteps in [("gaussian_ts (NDTC 0.4/0.4)", Gaussian(0.4, 0.4)), ("uniform_ts", Uniform())]:
        t0 = time.perf_counter()
        with torch.no_grad():
            calib = CalibrationRecipe(timesteps, Trajectory(), num_samples=SAMPLES, seed=SEED).build(
                forward(unet), sampler, (3, 32, 32), device, progress=False)
        ranged = calibrate_network(copy.deepcopy(unet), unet, calib, w4a8, forward, 64)
        network = ranged.network
        batches = list(calib.batches(64, device))
        units = find_units(network, ranged.order)
        total = torch.zeros(len(calib))
        per_unit = []
        for unit in units:
            inputs = capture(unet, unit.name, forward(unet), batches)
            target = capture(unet, unit.name, forward(unet), batches, inputs=False, outputs=True).output
            errors = torch.cat([per_sample_error(unit.module, *inputs.batch(idx, device), target[idx])
                                for idx in torch.arange(len(calib)).split(64)])
            total += errors
            per_unit.append((unit.name, errors))
        t = calib.t.long()
        print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n")
        print("| time steps | share of samples | share of the summed unit error | "
              "mean unit error per sample, relative to all samples |\n| --- | --- | --- | --- |")
        for lo, hi in GROUPS:
            sel = (t >= lo) & (t <= hi)
            if not sel.any():
                continue
            print(f"| {lo}-{hi} | {sel.float().mean():.3f} | "
                  f"{total[sel].sum() / total.sum():.3f} | {total[sel].mean() / total.mean():.2f} |")
        at0 = t == 0
        top = sorted(per_unit, key=lambda u: -float(u[1].sum()))[:8]
        print("\nUnits with the largest error: share of each unit's error on t = 0 samples\n")
        print("| unit | unit error (sum over samples) | share at t = 0 |\n| --- | --- | --- |")
        for unit_name, errors in top:
            print(f"| {unit_name} | {errors.sum():.2f} | {errors[at0].sum() / errors.sum():.3f} |")
        shares = torch.stack([e[at0].sum() / e.sum() for _, e in per_unit])
        print(f"\nOver all {len(per_unit)} units, share of each unit's error at t = 0: median {shares.median():.3f}, "
              f"min {shares.min():.3f}, max {shares.max():.3f}", flush=True)


if __name__ == "__main__":
    main()
