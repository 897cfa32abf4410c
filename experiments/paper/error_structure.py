"""How much of the quantized network's noise-prediction error a noise correction could remove (PTQD, Yuan et al.
2023: a part correlated with the FP prediction, eps_q - eps_fp = k * eps_fp + r, and a per-time-step mean bias).

Calibrates small_cifar10 at the given bits (the small CPU sizes of noise_error.py), predicts noise on held-out
inputs from the FP model's own DDIM trajectories (16 per sampler step), and reports per step: the relative error,
the share of its energy in a per-(step, channel) constant, the fitted k and the share of k * eps_fp; and over all
steps the share both corrections together could remove at most (fitted on the same inputs, so an upper bound).

    python experiments/paper/error_structure.py w8a8 > experiments/results/error_structure_cpu.txt
    python experiments/paper/error_structure.py w4a8_qdrop > experiments/results/error_structure_w4a8_cpu.txt

Modes (MODES): ``w8a8`` (range search), ``w4a8_qdrop`` (main_10k's best W4A8 recipe, Lp weights, split and
SmoothQuant, with 200 QDrop steps per unit so that it runs on a CPU; PTQD's own target was W4A8, where the
4-bit weights' error may be correlated with the prediction as the 8-bit activations' is not).
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir

from ptq4dm.calibration import Trajectory, Uniform
from ptq4dm.calibration.calibset import build_calibration_set
from ptq4dm.diffusion import Sampler
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR


MODES = {
    "w8a8": ["bits=w8a8"],
    "w4a8_qdrop": ["bits=w4a8", "weight_metric=mse", "ops.shortcut_split=true", "balance=smoothquant", "recon=qdrop",
                   "recon.method.iters=200"],
}


def main(mode: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = ["model=small_cifar10", "calib.num_samples=128", "calib.batch_size=64", "sampler.steps=20", *MODES[mode]]
    print(f"# {' '.join(base)}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=base)
    recipe, model = recipe_from_config(cfg), load_model(cfg.model)
    sampler = Sampler(model.scheduler, **cfg.sampler)
    module = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape)
    module.calibrate()
    held_out = build_calibration_set(module.in_precision(module.fp_unet), sampler, Uniform(), Trajectory(),
                                     20 * 16, model.image_shape, seed=99, batch_size=80, progress=False)
    with torch.no_grad():
        batches = range(0, len(held_out.x), 80)
        ref = torch.cat([module.fp_unet(held_out.x[i:i + 80], held_out.t[i:i + 80]).sample for i in batches])
        out = torch.cat([module.unet(held_out.x[i:i + 80], held_out.t[i:i + 80]).sample for i in batches])
    err = out - ref
    total, bias_energy, corr_energy, both_energy = err.pow(2).sum(), 0.0, 0.0, 0.0
    print("| t | relative error | bias share | k | k * eps_fp share |\n| --- | --- | --- | --- | --- |")
    for t in held_out.t.unique():
        at = held_out.t == t
        e, r = err[at], ref[at]
        bias = e.mean(dim=(0, 2, 3), keepdim=True).expand_as(e)  # one constant per channel at this step
        k = (e * r).sum() / r.pow(2).sum()  # least-squares fit of e ~ k * eps_fp
        k_rest = ((e - bias) * r).sum() / r.pow(2).sum()
        bias_energy += bias.pow(2).sum()
        corr_energy += (k * r).pow(2).sum()
        both_energy += (bias + k_rest * r).pow(2).sum()
        print(f"| {int(t)} | {e.pow(2).sum() / r.pow(2).sum():.2e} | {bias.pow(2).sum() / e.pow(2).sum():.3f} | "
              f"{k:.4f} | {(k * r).pow(2).sum() / e.pow(2).sum():.3f} |")
    print(f"\n{mode}: relative error {total / ref.pow(2).sum():.3e}; share of the error energy: per-(step, channel) "
          f"bias {bias_energy / total:.3f}, k * eps_fp {corr_energy / total:.3f}, both {both_energy / total:.3f}")


if __name__ == "__main__":
    chosen = sys.argv[1] if sys.argv[1:] else "w8a8"
    if chosen not in MODES:
        sys.exit(f"mode {chosen!r}: allowed are {sorted(MODES)}")
    main(chosen)
