"""Does learning the 4-bit weights' step with their rounding (recon.method.learn_weight_scale) lower what
reconstruction leaves? One unit at a time, on the CPU, set up as recon_generalisation.py (small_cifar10 W4A8 after
the range search, unit inputs from the full-precision network, NDTC inputs from DDIM 20 trajectories, the last
HELD samples never trained on).

For each unit, QDrop at its preset settings with the step fixed (the preset) and learned at two rates; the unit's
output error on its training samples and on the held-out ones, before and after.

    python experiments/reconstruction/weight_scale_proxy.py > experiments/results/weight_scale_proxy_cpu.txt
"""

from __future__ import annotations

import copy
import platform
import time
from contextlib import nullcontext

import torch

from ptq4dm.quant.api import quantizers
from ptq4dm.reconstruction import QDropReconstruction, ReconstructionContext, find_units
from recon_generalisation import forward, w4a8_after_range_search  # the script beside this one: the set-up

UNITS = ["mid_block.resnets.1", "up_blocks.0.resnets.0", "up_blocks.3.resnets.2"]
TRAIN, HELD, ITERS, SEED = 512, 256, 2000, 1234
VARIANTS = {"step fixed (qdrop preset)": {}, "step learned, lr 1e-4": {"learn_weight_scale": True},
            "step learned, lr 1e-3": {"learn_weight_scale": True, "weight_scale_lr": 1e-3}}


def main() -> None:
    device = torch.device("cpu")
    t0 = time.perf_counter()
    unet, calib, ranged = w4a8_after_range_search(TRAIN + HELD, SEED)
    print(f"# small_cifar10 W4A8, unit inputs from FP, NDTC {TRAIN + HELD} samples (DDIM 20, seed {SEED}), last "
          f"{HELD} held out; QDrop preset settings, {ITERS} steps, one unit at a time; CPU {platform.machine()}, "
          f"torch {torch.__version__}; set-up {time.perf_counter() - t0:.0f} s")
    print("| unit | weight step | training samples: before -> after | held-out: before -> after | largest step "
          "change | seconds |\n| --- | --- | --- | --- | --- | --- |")
    for name in UNITS:
        for label, extra in VARIANTS.items():
            network = copy.deepcopy(ranged.network)
            unit = next(u for u in find_units(network, ranged.order) if u.name == name)
            before = {k: q.scale.clone() for k, q in quantizers(network.get_submodule(name)).items()
                      if ".weight_quantizers." in k}
            context = ReconstructionContext(unet, network, forward(unet), forward(network), calib, ranged.order,
                                            device, nullcontext, False)
            method = QDropReconstruction(iters=ITERS, held_out=HELD, inputs="fp", **extra)
            r = method.reconstruct_unit(unit, context, torch.Generator().manual_seed(0))
            after = quantizers(network.get_submodule(name))
            change = max(float((after[k].scale / s - 1).abs().max()) for k, s in before.items())
            print(f"| {name} | {label} | {r.loss_before:.4f} -> {r.loss_after:.4f} | {r.held_out_before:.4f} -> "
                  f"{r.held_out_after:.4f} | {change:.3f} | {r.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
