"""A CPU proxy for choosing quantization settings before spending GPU time on FID: calibrate small_cifar10 with
each variant and measure the relative error of the predicted noise, ||eps_q - eps_fp||^2 / ||eps_fp||^2, on 40
held-out inputs from the FP model's own DDIM trajectories (time steps uniform over the sampler's steps).

    python experiments/paper/noise_error.py > experiments/results/noise_error_cpu.txt
    python experiments/paper/noise_error.py balance > experiments/results/balance_proxy_cpu.txt
    python experiments/paper/noise_error.py timesteps > experiments/results/timestep_ranges_proxy_cpu.txt
    python experiments/paper/noise_error.py balance_quantile > experiments/results/balance_quantile_proxy_cpu.txt
    python experiments/paper/noise_error.py timestep_groups > experiments/results/timestep_groups_proxy_cpu.txt
    python experiments/paper/noise_error.py act_stage > experiments/results/act_stage_proxy_cpu.txt
    python experiments/paper/noise_error.py balance_center > experiments/results/balance_center_proxy_cpu.txt
    python experiments/paper/noise_error.py precision > experiments/results/simulation_precision_cpu.txt
    python experiments/paper/noise_error.py w4a8_groups > experiments/results/w4a8_groups_proxy_cpu.txt

Each variant is a list of Hydra overrides on top of the small CPU sizes below; edit VARIANTS (or the set of
another mode: BALANCE, BALANCE_QUANTILE, TIMESTEPS, TIMESTEP_GROUPS, ACT_STAGE, BALANCE_CENTER, PRECISION,
W4A8_GROUPS) to add
one. The calibration seconds are wall time on
whatever else the machine was doing.
"""

from __future__ import annotations

import platform
import sys
import time

import torch
from hydra import compose, initialize_config_dir

from ptq4dm.calibration import Trajectory, Uniform
from ptq4dm.calibration.calibset import build_calibration_set
from ptq4dm.diffusion import Sampler
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR

BASE = ["model=small_cifar10", "bits=w8a8", "calib.num_samples=128", "calib.batch_size=64", "sampler.steps=20"]
VARIANTS = {
    "ptq4dm (mse, p=2.4)": [],
    "ptq4dm + shortcut split": ["ops.shortcut_split=true"],
    "ptq4dm, mse p=2": ["metric.fn.p=2.0"],
    "ptq4dm, l1": ["metric=l1"],
    "ptq4dm + x_t quantized": ["ops.network_input=true"],
    # where the error comes from: activations or weights, and which layers (left in full precision one group at
    # a time; these are diagnostics, not W8A8 any more)
    "weights only (w8a16)": ["bits=w8a16"],
    "weights only (w8a32)": ["bits=w8a32"],
    "weights with min/max ranges": ["weight_metric=minmax"],
    "FP: time embedding + time_emb_proj": ['ops.exclude=["time_embedding.*","*.time_emb_proj"]'],
    "FP: attention projections": ['ops.exclude=["*attentions*"]'],
    "FP: conv_shortcut (skip concat readers)": ['ops.exclude=["*.conv_shortcut"]'],
    "FP: resnet conv1": ['ops.exclude=["*.conv1"]'],
    "FP: resnet conv2": ['ops.exclude=["*.conv2"]'],
    "FP: down_blocks": ['ops.exclude=["down_blocks.*"]'],
    "FP: up_blocks.3 (32x32 decoder)": ['ops.exclude=["up_blocks.3.*"]'],
}
# Channel balance (balance/, SmoothQuant) against range search alone, at W8A8 and W4A8
BALANCE = {
    "w8a8 default": [],
    "w8a8 smoothquant a=0.5": ["balance=smoothquant"],
    "w8a8 smoothquant a=0.7": ["balance=smoothquant", "balance.method.alpha=0.7"],
    "w8a8 smoothquant a=0.85": ["balance=smoothquant", "balance.method.alpha=0.85"],
    "w4a8 default": ["bits=w4a8"],
    "w4a8 smoothquant a=0.5": ["bits=w4a8", "balance=smoothquant"],
    "w8a16 (weights only)": ["bits=w8a16"],
}
# SmoothQuant's max|x_j| against a quantile over calibration samples of each sample's channel maximum
# (balance=smoothquant_quantile): does keeping the most extreme samples from setting the factors help?
BALANCE_QUANTILE = {
    "w8a8 default": [],
    "w8a8 smoothquant (max)": ["balance=smoothquant"],
    "w8a8 smoothquant_quantile q=0.99": ["balance=smoothquant_quantile"],
    "w8a8 smoothquant_quantile q=0.9": ["balance=smoothquant_quantile", "balance.method.sample_quantile=0.9"],
    "w8a8 smoothquant_quantile q=0.5": ["balance=smoothquant_quantile", "balance.method.sample_quantile=0.5"],
    # main_10k's calibration size, where one outlying trajectory among 1024 is what the quantile should ignore
    "w8a8 default, 1024 samples": ["calib.num_samples=1024"],
    "w8a8 smoothquant (max), 1024 samples": ["calib.num_samples=1024", "balance=smoothquant"],
    "w8a8 smoothquant_quantile q=0.99, 1024 samples": ["calib.num_samples=1024", "balance=smoothquant_quantile"],
}
# Where the W8A8 error lives in time: calibration time steps concentrated near t = 0 against NDTC (does a range
# fitted to late steps lower their error? if so, time-step-aware activation ranges are worth building)
TIMESTEPS = {
    "w8a8 NDTC (0.4, 0.4)": [],
    "w8a8 calibrated at t ~ N(0.05 T, 0.05 T)": ["calib.timesteps.mean=0.05", "calib.timesteps.std=0.05"],
}


# Time-step-aware activation ranges, an upper bound without building them: one calibration per time-step window
# (NDTC's normal draw narrowed to it), each read in its own window's column against NDTC's one range for all t.
# The windows split the early steps too, where the error that costs contrast is made (contrast_by_step_cpu.txt).
TIMESTEP_GROUPS = {
    "w8a8 NDTC (0.4, 0.4), one range for all t": [],
    "w8a8 calibrated at t ~ N(0.1 T, 0.05 T)": ["calib.timesteps.mean=0.1", "calib.timesteps.std=0.05"],
    "w8a8 calibrated at t ~ N(0.35 T, 0.08 T)": ["calib.timesteps.mean=0.35", "calib.timesteps.std=0.08"],
    "w8a8 calibrated at t ~ N(0.75 T, 0.13 T)": ["calib.timesteps.mean=0.75", "calib.timesteps.std=0.13"],
}

# Q-Diffusion's activation stage (recon=qdiffusion: step sizes learned after the rounding, every activation on)
# against the rounding alone (brecq) and QDrop's joint learning, at W8A8 where the 8-bit activations cost most;
# few steps per unit, so that it runs on a CPU (a direction, not the GPU's 5000-20000 steps).
STEPS = 200
ACT_STAGE = {
    "w8a8 range search only": [],
    f"w8a8 brecq, {STEPS} steps": ["recon=brecq", f"recon.method.iters={STEPS}"],
    f"w8a8 qdrop, {STEPS} steps": ["recon=qdrop", f"recon.method.iters={STEPS}"],
    f"w8a8 qdiffusion, {STEPS} + {STEPS} steps": ["recon=qdiffusion", f"recon.method.weights.iters={STEPS}",
                                                  f"recon.method.activations.iters={STEPS}"],
    # which part of the activation stage: its inputs (Q-Diffusion's FP inputs against what the unit receives in
    # the quantized network) or its rate (4e-4 against QDrop's 4e-5)
    f"w8a8 qdiffusion, {STEPS} + {STEPS} steps, activation stage on quantized inputs": [
        "recon=qdiffusion", f"recon.method.weights.iters={STEPS}", f"recon.method.activations.iters={STEPS}",
        "recon.method.activations.inputs=quantized"],
    f"w8a8 qdiffusion, {STEPS} + {STEPS} steps, activation rate 4e-5": [
        "recon=qdiffusion", f"recon.method.weights.iters={STEPS}", f"recon.method.activations.iters={STEPS}",
        "recon.method.activations.act_lr=4e-5"],
}

# Channel shifting (balance.method.center, Outlier Suppression+) on top of SmoothQuant's scaling: a SiLU output's
# -0.28 no longer stretches the shared grid of a balanced layer's input
BALANCE_CENTER = {
    "w8a8 smoothquant a=0.5": ["balance=smoothquant"],
    "w8a8 smoothquant_centered a=0.5": ["balance=smoothquant_centered"],
    "w8a8 smoothquant_centered a=0.75": ["balance=smoothquant_centered", "balance.method.alpha=0.75"],
    "w8a8 smoothquant_centered a=1": ["balance=smoothquant_centered", "balance.method.alpha=1.0"],
    # W4A8 with the 4-bit weights' Lp range search and the split, as main_10k's best W4A8 recipe starts
    "w4a8 weight_metric=mse split smoothquant a=0.5": ["bits=w4a8", "weight_metric=mse", "ops.shortcut_split=true",
                                                      "balance=smoothquant"],
    "w4a8 weight_metric=mse split smoothquant_centered a=0.5": [
        "bits=w4a8", "weight_metric=mse", "ops.shortcut_split=true", "balance=smoothquant_centered"],
    # does the W8A8 gain survive QDrop's reconstruction (few steps, as act_stage)?
    f"w8a8 smoothquant a=0.5, qdrop {STEPS} steps": ["balance=smoothquant", "recon=qdrop",
                                                     f"recon.method.iters={STEPS}"],
    f"w8a8 smoothquant_centered a=0.5, qdrop {STEPS} steps": ["balance=smoothquant_centered", "recon=qdrop",
                                                              f"recon.method.iters={STEPS}"],
}

# How much of the simulated error is the compute precision's: each variant's error against FP with both networks
# in float32 and with both under bfloat16 autocast, as the GPU jobs sample (eval.precision=bf16). Calibrated in
# float32 either way (the CPU's calibration precision).
# main_10k's best W4A8 recipe as it starts (before its reconstruction)
W4A8 = ["bits=w4a8", "weight_metric=mse", "ops.shortcut_split=true", "balance=smoothquant"]
PRECISION = {
    "w8a8 range search": [],
    "w8a8 smoothquant": ["balance=smoothquant"],
    "w4a8 weight_metric=mse split smoothquant": W4A8,
    # after reconstruction the 4-bit weights' error is smaller, so bf16's share of what is left may be larger
    f"w4a8 weight_metric=mse split smoothquant, qdrop {STEPS} steps": W4A8 + ["recon=qdrop",
                                                                              f"recon.method.iters={STEPS}"],
}

# Where W4A8's error lives once the best recipe's start is in place: groups of layers left in full precision one
# at a time (diagnostics, not W4A8 any more). The temporal path (time embedding and every block's time_emb_proj)
# sees only the sampler's finite set of time steps, so it could be reconstructed exactly over that set (TFMQ-DM,
# Huang et al. 2024): worth building only if it holds a real share of the error.
W4A8_GROUPS = {
    "w4a8 weight_metric=mse split smoothquant": W4A8,
    "  FP: temporal path (time embedding + time_emb_proj)": W4A8 + [
        'ops.exclude=["time_embedding.*","*.time_emb_proj"]'],
    "  FP: attention": W4A8 + ['ops.exclude=["*attentions*"]'],
    "  FP: conv_shortcut (skip concat readers)": W4A8 + ['ops.exclude=["*.conv_shortcut"]'],
    "  FP: resnet conv1": W4A8 + ['ops.exclude=["*.conv1"]'],
    "  FP: resnet conv2": W4A8 + ['ops.exclude=["*.conv2"]'],
    "  FP: down_blocks": W4A8 + ['ops.exclude=["down_blocks.*"]'],
    "  FP: mid_block": W4A8 + ['ops.exclude=["mid_block.*"]'],
    "  FP: up_blocks.3 (32x32 decoder)": W4A8 + ['ops.exclude=["up_blocks.3.*"]'],
    "  activations FP (w4a32)": W4A8[1:] + ["bits=w4a32"],
    f"w4a8 weight_metric=mse split smoothquant, qdrop {STEPS} steps": W4A8 + ["recon=qdrop",
                                                                              f"recon.method.iters={STEPS}"],
    f"  FP: temporal path, qdrop {STEPS} steps": W4A8 + ['ops.exclude=["time_embedding.*","*.time_emb_proj"]',
                                                        "recon=qdrop", f"recon.method.iters={STEPS}"],
}


def main(variants: dict[str, list[str]] = VARIANTS, windows=((0, 200), (200, 1000)), held_out_n: int = 40,
         precisions=("fp32",)) -> None:
    torch.set_num_threads(2)
    print(f"# {' '.join(BASE)}; {held_out_n} held-out inputs; CPU: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    names = [f"t < {hi}" if lo == 0 else f"t >= {lo}" if hi >= 1000 else f"{lo} <= t < {hi}" for lo, hi in windows]
    print(f"| variant | relative eps error | {' | '.join(names)} | calibration (s) |")
    print("| --- " * (len(windows) + 3) + "|")
    held_out = None
    for name, extra in variants.items():
        torch.manual_seed(0)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=BASE + extra)
        recipe, model = recipe_from_config(cfg), load_model(cfg.model)
        sampler = Sampler(model.scheduler, **cfg.sampler)
        module = PTQModule(model.unet, sampler, sampler, recipe, progress=False, image_shape=model.image_shape)
        t0 = time.perf_counter()
        module.calibrate()
        seconds = time.perf_counter() - t0
        if held_out is None:  # the same inputs for every variant, from another seed than calibration
            held_out = build_calibration_set(module.in_precision(module.fp_unet), sampler, Uniform(), Trajectory(),
                                             held_out_n, model.image_shape, seed=99, batch_size=40, progress=False)
        for precision in precisions:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                ref = module.fp_unet(held_out.x, held_out.t).sample.float()
                out = module.unet(held_out.x, held_out.t).sample.float()
            err = (out - ref).pow(2).flatten(1).mean(1) / ref.pow(2).flatten(1).mean(1)
            parts = [f"{err[(held_out.t >= lo) & (held_out.t < hi)].mean():.2e}" for lo, hi in windows]
            label = name if len(precisions) == 1 else f"{name}, both in {precision}"
            print(f"| {label} | {err.mean():.2e} | {' | '.join(parts)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    sets = {"": VARIANTS, "balance": BALANCE, "balance_quantile": BALANCE_QUANTILE, "timesteps": TIMESTEPS,
            "timestep_groups": TIMESTEP_GROUPS, "act_stage": ACT_STAGE,
            "balance_center": BALANCE_CENTER, "precision": PRECISION, "w4a8_groups": W4A8_GROUPS}
    mode, only = (sys.argv[1] if sys.argv[1:] else ""), sys.argv[2:]  # e.g. "act_stage 4 5": those variants only
    if mode not in sets:
        sys.exit(f"mode {mode!r}: allowed are {sorted(m for m in sets if m)} or none (the default variants)")
    variants = sets[mode]
    wrong = [p for p in only if p not in map(str, range(len(variants)))]
    if wrong:
        sys.exit(f"variant positions {wrong}: allowed are 0 to {len(variants) - 1} for mode {mode!r}")
    chosen = {k: v for i, (k, v) in enumerate(variants.items()) if not only or str(i) in only}
    if mode == "timestep_groups":
        main(chosen, windows=((0, 200), (200, 500), (500, 1000)), held_out_n=120)
    elif mode == "precision":
        main(chosen, held_out_n=80, precisions=("fp32", "bf16"))
    else:
        main(chosen)
