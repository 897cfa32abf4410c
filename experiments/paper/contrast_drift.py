"""Quantized images have less contrast than the FP ones: where it comes from, and whether PTQD's correlated-noise
correction restores it. A CPU proxy on small_cifar10 (DDIM 100, fp32).

Every quantized job's committed 64-image grid in experiments/results/main_10k and main_10k_recon has a lower
per-image pixel standard deviation than the FP grid from the same noise (median ratio 0.94 to 0.97 for W8A8 and
reconstructed W4A8) and about half as many saturated pixels (experiments/paper/grid_contrast.py,
experiments/results/grid_contrast.txt). A systematic shrink is what FID over FP sees and PSNR to FP hardly does. This script quantizes the model
(W8A8 range search, NDTC 256 samples, as ``ops=ptq4dm`` at its defaults) and samples the same seeds with

- the FP network, the quantized one, its weights alone and its activations alone quantized;
- the quantized network with PTQD's correlated-noise correction (He et al. 2023, section 4.1): the noise
  prediction's error modelled per sampler step as k_t * eps_fp plus a part uncorrelated with it, and the
  prediction divided by (1 + k_t); k_t fitted by least squares on FP trajectories of other seeds (teacher-forced:
  both networks on the same x_t), so nothing is fitted on the evaluation images;
- the same plus a per-step, per-channel mean of the remaining error subtracted (PTQD's bias correction).

Per variant: the median over images of the per-image std ratio (quantized / FP) and of the regression slope of
quantized on FP pixels (1 = no contrast change), PSNR to FP, and the mean shift in 8-bit levels.

    python experiments/paper/contrast_drift.py > experiments/results/contrast_drift_cpu.txt

``steps``: where along the trajectory the 8-bit activations cost contrast. The same quantized network with its
activation quantizers on at every step, only at the late steps (t < LATE) or only at the early ones (weights
8-bit throughout); no correction fitted. If the late steps alone cost most of it, time-step-aware activation
ranges are the lever; if not, the whole trajectory is.

    python experiments/paper/contrast_drift.py steps > experiments/results/contrast_by_step_cpu.txt

``ranges``: whether the activation ranges' clipping is what shrinks contrast. The same network calibrated with
activation ranges at the observed min/max (no clipping) and at the 99.99th percentiles, weights as above.

    python experiments/paper/contrast_drift.py ranges > experiments/results/contrast_by_range_cpu.txt

``split``: whether Q-Diffusion's shortcut splitting (``ops.shortcut_split=true``: separate activation ranges for
the two halves of each skip concat) restores contrast; the default search otherwise.

    python experiments/paper/contrast_drift.py split > experiments/results/contrast_by_split_cpu.txt

``balance``: SmoothQuant's channel balance (alpha 0.5) with and without centring the channels first
(``balance=smoothquant`` and ``balance=smoothquant_centered``), range search otherwise.

    python experiments/paper/contrast_drift.py balance > experiments/results/contrast_by_balance_cpu.txt

``eps_scale``: whether the lost contrast is a matter of how much noise the sampler takes off (exposure bias): the
quantized network's noise prediction divided by a constant lambda slightly above 1 at every step (epsilon
scaling, Ning et al. 2024) leaves more of x_t in the predicted x_0. Chosen on the evaluation images, so a
diagnostic only: if a lambda restores contrast and PSNR together, a lambda fitted on other seeds is worth building.

    python experiments/paper/contrast_drift.py eps_scale > experiments/results/contrast_by_eps_scale_cpu.txt

``groups``: which activation quantizers cost the contrast. Weights 8-bit throughout and the 8-bit activations on
only in one group of layers at a time, by place in the UNet (the time-embedding path, the down blocks, the mid
block, up_blocks 0-2, up_blocks.3, conv_out) and by what the layer reads (every skip/shortcut input, every input
after GroupNorm + SiLU, the attention projections, the down/upsampler convs). The group whose quantizers alone
shrink the images as much as all of them is where a remedy has to act.

    python experiments/paper/contrast_drift.py groups > experiments/results/contrast_by_group_cpu.txt
"""

from __future__ import annotations

import copy
from fnmatch import fnmatch
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import ptq4dm
from ptq4dm.calibration import (CalibrationRecipe, CalibrationSet, ChannelBalance, Gaussian, MinMax, Percentile,
                                RangeSearch, Trajectory)
from ptq4dm.diffusion.sampler import to_uint8
from ptq4dm.engine import PTQMethod, calibrate_network
from ptq4dm.models import load_diffusion_model
from ptq4dm.quant.api import quantizers
from ptq4dm.utils.precision import denoiser

STEPS, CALIB, SEED = 100, 256, 1234
EVAL_SEEDS, FIT_SEEDS = range(0, 64), range(1000, 1032)
EPS_SCALES = (1.002, 1.005, 1.01)  # eps_scale: the noise prediction divided by these at every step
LATE = 200  # steps below this t are "late" (the noise error's late-step concentration, noise_error_cpu.txt)


def noise(seeds, shape=(3, 32, 32)) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def contrast(q: torch.Tensor, fp: torch.Tensor) -> dict:
    q, fp = q.float(), fp.float()
    qc, fc = q - q.mean((1, 2, 3), keepdim=True), fp - fp.mean((1, 2, 3), keepdim=True)
    slope = (qc * fc).sum((1, 2, 3)) / (fc * fc).sum((1, 2, 3))
    ratio = q.std((1, 2, 3)) / fp.std((1, 2, 3))
    mse = ((q - fp) / 255).pow(2).mean((1, 2, 3))
    return {"std ratio": float(ratio.median()), "slope": float(slope.median()),
            "psnr": float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()),
            "shift": ", ".join(f"{v:+.2f}" for v in (q - fp).mean((0, 2, 3)).tolist()),
            "saturated": float(((q == 0) | (q == 255)).float().mean())}


def fit_correction(sampler, fp, q, x_noise):
    """Per sampler step: k_t (least squares of eps_q - eps_fp on eps_fp) and the per-channel mean of what is left,
    teacher-forced on the FP trajectories from ``x_noise``."""
    k, bias = {}, {}

    def on_step(i, t, x):
        e_fp, e_q = fp(x, t), q(x, t)
        d = e_q - e_fp
        k[int(t)] = float((d * e_fp).sum() / (e_fp * e_fp).sum())
        bias[int(t)] = (d - k[int(t)] * e_fp).mean((0, 2, 3), keepdim=True)

    sampler.sample(fp, x_noise, on_step=on_step)
    return k, bias


MODES = ("correction", "steps", "ranges", "split", "eps_scale", "balance", "groups")

# groups: activation quantizers by the name of the layer they feed (fnmatch patterns on the layer name); the
# time-embedding path's layers are in the first group only
GROUPS = {
    "time-embedding path (time_embedding.*, every time_emb_proj)": ("time_embedding.*", "*.time_emb_proj"),
    "down_blocks (no time_emb_proj)": ("down_blocks.*",),
    "mid_block (no time_emb_proj)": ("mid_block.*",),
    "up_blocks.0-2 (no time_emb_proj)": ("up_blocks.[012].*",),
    "up_blocks.3 (no time_emb_proj)": ("up_blocks.3.*",),
    "conv_out": ("conv_out",),
    "every conv_shortcut (skip concat or channel change)": ("*.conv_shortcut",),
    "every conv1 / conv2 (after GroupNorm + SiLU)": ("*.conv1", "*.conv2"),
    "attention projections (to_q, to_k, to_v, to_out)": ("*.to_[qkv]", "*.to_out.0"),
    "down/upsampler convs": ("*samplers.0.conv",),
}


@dataclass
class Setup:
    """small_cifar10 in fp32, its DDIM sampler, and an NDTC calibration set of its own FP trajectories."""

    unet: torch.nn.Module
    sampler: ptq4dm.Sampler
    fp: Callable
    calib: CalibrationSet

    @classmethod
    @torch.no_grad()
    def build(cls, num_samples: int = CALIB) -> "Setup":
        model = load_diffusion_model("small_cifar10")
        unet = model.unet.eval()
        sampler = ptq4dm.Sampler(model.scheduler, "ddim", steps=STEPS)
        fp = denoiser(unet)
        calib = CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory(), num_samples=num_samples, seed=SEED).build(
            fp, sampler, (3, 32, 32), "cpu", progress=False)
        return cls(unet, sampler, fp, calib)

    def quantized(self, search: RangeSearch | None = None, balance: ChannelBalance | None = None,
                  **quant) -> torch.nn.Module:
        """A W8A8 copy calibrated as ``ops=ptq4dm`` (``quant``: QuantConfig fields to change), no reconstruction."""
        method = PTQMethod(ptq4dm.QuantConfig(weight_bits=8, act_bits=8, **quant), search or RangeSearch(), None,
                           balance)
        return calibrate_network(copy.deepcopy(self.unet), self.unet, self.calib, method, denoiser, 64).network


def main(mode: str = "correction") -> None:
    if mode not in MODES:
        raise SystemExit(f"mode={mode!r}: allowed are {', '.join(MODES)}")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    setup = Setup.build()
    sampler, fp = setup.sampler, setup.fp
    named = "weights: the default search; activations as named"
    ranges = {"ranges": named, "split": named, "balance": "range search; channel balance as named"}.get(
        mode, "range search")
    header = (f"# small_cifar10 W8A8 ({ranges}, NDTC {CALIB} samples, seed {SEED}), DDIM {STEPS}, fp32, "
              f"{len(EVAL_SEEDS)} images (seeds {EVAL_SEEDS.start}..{EVAL_SEEDS.stop - 1}); "
              f"CPU {platform.machine()}, torch {torch.__version__}")
    # The default search's row for ranges, split and balance is contrast_drift_cpu.txt's "quantized (W8A8)".
    if mode == "ranges":
        variants = {"activations at the observed min/max": denoiser(setup.quantized(RangeSearch(metric=MinMax()))),
                    "activations at the 99.99th percentiles":
                        denoiser(setup.quantized(RangeSearch(metric=Percentile(99.99))))}
    if mode == "split":
        variants = {"shortcut split (ops.shortcut_split=true)": denoiser(setup.quantized(shortcut_split=True))}
    if mode == "balance":
        variants = {"balance=smoothquant": denoiser(setup.quantized(balance=ChannelBalance(0.5))),
                    "balance=smoothquant_centered": denoiser(setup.quantized(balance=ChannelBalance(0.5, center=True)))}
    if mode in ("ranges", "split", "balance"):
        print(f"{header}; set-up {time.perf_counter() - t0:.0f} s")
        compare(sampler, fp, variants)
        return
    qnet = setup.quantized()
    q = denoiser(qnet)
    if mode == "eps_scale":
        print(f"{header}; set-up {time.perf_counter() - t0:.0f} s")
        def scaled(lam: float) -> Callable:
            return lambda x, t: q(x, t) / lam

        variants = {"W8A8": q, **{f"W8A8, eps / {lam}": scaled(lam) for lam in EPS_SCALES}}
        compare(sampler, fp, variants)
        return
    acts = [qz for name, qz in quantizers(qnet).items() if ".weight_quantizers." not in name]
    weights = [qz for name, qz in quantizers(qnet).items() if ".weight_quantizers." in name]

    def only(group, when=lambda t: True):
        """The quantized network with only ``group``'s quantizers on, at the steps where ``when(t)``, else
        weights only."""
        def run(x, t):
            saved = [qz.enabled for qz in acts + weights]
            on = group if when(int(t)) else set(weights)
            for qz in acts + weights:
                qz.enabled = qz in on
            try:
                return q(x, t)
            finally:
                for qz, s in zip(acts + weights, saved):
                    qz.enabled = s
        return run

    everything = set(acts + weights)
    if mode == "groups":
        temb = ("time_embedding.*", "*.time_emb_proj")
        act_layers = [(name.split(".input_quantizers.")[0], qz) for name, qz in quantizers(qnet).items()
                      if ".weight_quantizers." not in name]

        def group(patterns) -> list:
            """The activation quantizers of the layers ``patterns`` match; the time-embedding path's only in its
            own group."""
            own = patterns == temb
            return [qz for layer, qz in act_layers if any(fnmatch(layer, p) for p in patterns)
                    and (own or not any(fnmatch(layer, p) for p in temb))]

        print(f"{header}; set-up {time.perf_counter() - t0:.0f} s; weights 8-bit in every variant")
        variants = {"W8A8 (every group)": q, "W8 throughout, A8 never": only(set(weights))}
        for label, patterns in GROUPS.items():
            members = group(patterns)
            variants[f"A8 only in {label}: {len(members)} quantizers"] = only(set(weights) | set(members))
    elif mode == "steps":
        print(f"{header}; set-up {time.perf_counter() - t0:.0f} s; late steps: t < {LATE}")
        variants = {
            "W8A8 at every step": q,
            "W8 throughout, A8 only at late steps (t < %d)" % LATE: only(everything, lambda t: t < LATE),
            "W8 throughout, A8 only at early steps (t >= %d)" % LATE: only(everything, lambda t: t >= LATE),
            "W8 throughout, A8 never": only(set(weights)),
        }
    else:
        k, bias = fit_correction(sampler, fp, q, noise(FIT_SEEDS))
        print(f"{header}; correction fitted on {len(FIT_SEEDS)} other seeds; set-up {time.perf_counter() - t0:.0f} s")
        ks = torch.tensor([k[int(t)] for t in sampler.timesteps])
        print(f"# k_t over the {STEPS} steps: mean {ks.mean():+.5f}, at t = {int(sampler.timesteps[0])} "
              f"{ks[0]:+.5f}, t = {int(sampler.timesteps[STEPS // 2])} {ks[STEPS // 2]:+.5f}, "
              f"t = {int(sampler.timesteps[-1])} {ks[-1]:+.5f}; steps with k_t < 0: {int((ks < 0).sum())}")
        variants = {
            "quantized (W8A8)": q,
            "weights only (W8, activations FP)": only(set(weights)),
            "activations only (A8, weights FP)": only(set(acts)),
            "W8A8 + correlated-noise correction (eps / (1 + k_t))": lambda x, t: q(x, t) / (1 + k[int(t)]),
            "W8A8 + correlated + per-channel bias correction":
                lambda x, t: (q(x, t) - bias[int(t)]) / (1 + k[int(t)]),
        }
    compare(sampler, fp, variants)


def compare(sampler, fp, variants) -> None:
    x_eval = noise(EVAL_SEEDS)
    t1 = time.perf_counter()
    fp_images = to_uint8(sampler.sample(fp, x_eval))
    print(f"# FP sampling {time.perf_counter() - t1:.0f} s; FP saturated pixels "
          f"{float(((fp_images == 0) | (fp_images == 255)).float().mean()):.4f}")
    print("| variant | per-image std ratio (median) | slope on FP (median) | PSNR to FP (dB) | mean shift R, G, B "
          "(levels) | saturated pixels |\n| --- | --- | --- | --- | --- | --- |")
    for name, run in variants.items():
        c = contrast(to_uint8(sampler.sample(run, x_eval)), fp_images)
        print(f"| {name} | {c['std ratio']:.4f} | {c['slope']:.4f} | {c['psnr']:.2f} | {c['shift']} | "
              f"{c['saturated']:.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "correction")
