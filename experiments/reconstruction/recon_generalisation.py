"""Does reconstruction overfit its calibration samples? One unit at a time, on the CPU.

small_cifar10 at W4A8 after the range search; the unit's inputs from the full-precision network (no
reconstruction upstream, whose error would swamp the unit's own); NDTC calibration inputs (Gaussian
0.4/0.4, DDIM trajectories; 20 steps here, 100 in main_10k, to keep the CPU build short), and HELD of them
never trained on. For each unit, number of training samples and number of steps, QDrop (the preset's settings)
reconstructs that unit alone, and its output error is measured on up to 256 of its training samples and on the
held-out ones (``recon.method.held_out``). A gap that opens as steps grow, and closes with more training
samples, says that the 10k jobs' 1024 samples limit what more steps can buy.

    python experiments/reconstruction/recon_generalisation.py > experiments/results/recon_generalisation_cpu.txt

The units are the ones with the largest error left after 10000 steps in main_10k's W4A8 job (4x4 resolution,
so cheap on a CPU). Seconds are wall time on whatever else the machine was doing.
"""

from __future__ import annotations

import copy
import platform
import time
from contextlib import nullcontext

import torch

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, Gaussian, RangeSearch, Trajectory
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.engine import PTQMethod, calibrate_network
from ptq4dm.models import load_diffusion_model
from ptq4dm.reconstruction import QDropReconstruction, ReconstructionContext, find_units
from ptq4dm.utils.precision import denoiser

UNITS = ["mid_block.resnets.1", "up_blocks.0.resnets.0"]
TRAIN = [256, 1024]  # training samples
ITERS = [1000, 4000]
HELD = 256
SEED = 1234


def subset(calib: CalibrationSet, rows: torch.Tensor) -> CalibrationSet:
    return CalibrationSet(x=calib.x[rows], t=calib.t[rows], step_index=calib.step_index[rows])


def forward(network):
    return denoiser(network, "fp32")


def w4a8_after_range_search(num_samples: int, seed: int = SEED):
    """small_cifar10's FP UNet, NDTC calibration inputs (DDIM 20) and its W4A8 copy after the range search alone
    (2 CPU threads): what the per-unit studies start from."""
    torch.set_num_threads(2)
    model = load_diffusion_model("small_cifar10")
    unet = model.unet.eval()
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=20)
    with torch.no_grad():
        calib = CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=num_samples, seed=seed).build(
            forward(unet), sampler, (3, 32, 32), torch.device("cpu"), progress=False)
    w4a8 = PTQMethod(ptq4dm.QuantConfig(weight_bits=4, act_bits=8), RangeSearch(), None, None)
    return unet, calib, calibrate_network(copy.deepcopy(unet), unet, calib, w4a8, forward, 256)


def main(units=UNITS, train=TRAIN, iters=ITERS) -> None:
    device = torch.device("cpu")
    n_all = max(train) + HELD
    t0 = time.perf_counter()
    unet, calib, ranged = w4a8_after_range_search(n_all)
    print(f"# small_cifar10 W4A8, unit inputs from FP, NDTC {n_all} samples (DDIM 20, seed {SEED}), last {HELD} "
          f"held out; QDrop preset settings, one unit at a time; CPU {platform.machine()}, torch {torch.__version__}; "
          f"set-up {time.perf_counter() - t0:.0f} s")
    print("| unit | training samples | steps | error on training samples: before -> after | held-out: before -> after "
          "| held-out / training after | seconds |\n| --- | --- | --- | --- | --- | --- | --- |")
    held = torch.arange(n_all - HELD, n_all)
    for name in units:
        for n_train in train:
            calib_n = subset(calib, torch.cat([torch.arange(n_train), held]))
            for steps in iters:
                network = copy.deepcopy(ranged.network)
                unit = next(u for u in find_units(network, ranged.order) if u.name == name)
                context = ReconstructionContext(unet, network, forward(unet), forward(network), calib_n,
                                                ranged.order, device, nullcontext, False)
                # inputs from the FP network: the unit's own fit, without the (unreconstructed) upstream's error
                method = QDropReconstruction(iters=steps, held_out=HELD, inputs="fp")
                r = method.reconstruct_unit(unit, context, torch.Generator().manual_seed(0))
                print(f"| {name} | {n_train} | {steps} | {r.loss_before:.4f} -> {r.loss_after:.4f} | "
                      f"{r.held_out_before:.4f} -> {r.held_out_after:.4f} | {r.held_out_after / r.loss_after:.3f} | "
                      f"{r.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
