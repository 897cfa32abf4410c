"""A quick check, on whatever device is there, that QDrop with the weights' step learned
(recon.method.learn_weight_scale) runs end to end the way the 10k jobs run it (CUDA graphs, fused Adam, bf16
autocast on a GPU), before a GPU batch spends its time on it. The CPU tests cover the arithmetic; this covers the
device path they cannot reach.

    python experiments/reconstruction/gpu_smoke.py      # tiny_cifar10, W4A8 + split, 64 samples, 200 steps
    python experiments/reconstruction/gpu_smoke.py 5    # 5 steps: the script itself, on a CPU in a minute

Prints the reconstruction's unit errors before -> after and the seconds; exits non-zero on any error.
"""

from __future__ import annotations

import sys
import time

import torch

import ptq4dm
from ptq4dm.calibration import CalibrationRecipe, Gaussian, Trajectory
from ptq4dm.models import load_diffusion_model
from ptq4dm.reconstruction import QDropReconstruction


def main(iters: int = 200) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_diffusion_model("tiny_cifar10")
    unet = model.unet.to(device).eval()
    config = ptq4dm.QuantConfig(weight_bits=4, act_bits=8, shortcut_split=True)
    calib = CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=64, seed=0)
    sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=20)
    t0 = time.perf_counter()
    q, report = ptq4dm.quantize(unet, model.scheduler, config, calib, sampler=sampler,
                                reconstruction=QDropReconstruction(iters=iters, learn_weight_scale=True))
    seconds = time.perf_counter() - t0
    units = report.reconstruction
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}): {len(units)} units, "
          f"{seconds:.0f} s")
    for u in units[:3] + units[-3:]:
        print(f"  {u.unit}: {u.loss_before:.4g} -> {u.loss_after:.4g}")
    x = torch.randn(4, 3, 32, 32, device=device)
    t = torch.full((4,), 500, device=device)
    with torch.no_grad():
        out = q(x, t).sample
    assert torch.isfinite(out).all(), "non-finite output after reconstruction"
    print("output finite; OK")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
