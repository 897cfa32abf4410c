"""Which 8-bit activation quantizers cost the most, where it reaches the images (t >= 200). A CPU proxy on
small_cifar10 (DDIM 100, fp32) to choose the next GPU runs of issue 15.

The network is calibrated as ``ops=ptq4dm bits=w8a8`` at its defaults (range search, NDTC ``CALIB`` samples,
seed 1234), once without and once with ``ops.shortcut_split=true``. Inputs: the FP network's own trajectory inputs
x_t at every ``EVERY``-th DDIM step with t >= ``EARLY`` for ``len(SEEDS)`` noise seeds other than the calibration's
(experiments/results/contrast_by_step_cpu.txt: the 8-bit activations cost contrast and PSNR there, not at t < 200).
Weights stay in full precision throughout, so only activation rounding is measured.

Per activation quantizer, the relative error of the predicted noise, sum |eps_q - eps_fp|^2 / sum |eps_fp|^2:
  alone           only this quantizer on
  without         every activation quantizer on except this one; ``all - without`` is what removing it saves
and the network's error with all of them on. Quantizers are listed by ``alone``, largest first, with their range.

    python experiments/paper/act_sensitivity.py > experiments/results/act_sensitivity_cpu.txt
"""

from __future__ import annotations

import platform
import time

import torch

from contrast_drift import SEED, STEPS, Setup, noise  # the script beside this one: model, sampler, calibration
from ptq4dm.calibration.search import describe_quantizer
from ptq4dm.quant.api import quantizers
from ptq4dm.utils.precision import denoiser

CALIB = 128
SEEDS, EVERY, EARLY = range(2000, 2006), 5, 200
TOP = 25


def trajectory_inputs(sampler, fp) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP network's inputs (x_t, t) at every EVERY-th step with t >= EARLY, for the noise seeds SEEDS."""
    xs, ts = [], []

    def keep(i, t, x):
        if int(t) >= EARLY and i % EVERY == 0:
            xs.append(x.clone())
            ts.append(torch.full((len(x),), int(t)))

    sampler.sample(fp, noise(SEEDS), on_step=keep)
    return torch.cat(xs), torch.cat(ts)


def predict(run, x, t, batch: int = 128) -> torch.Tensor:
    return torch.cat([run(x[s: s + batch], t[s: s + batch]) for s in range(0, len(x), batch)])


def table(qnet, fp_out, x, t, title: str) -> None:
    q = denoiser(qnet)
    fp_energy = float(fp_out.pow(2).sum())
    named = quantizers(qnet)
    acts = {n: qz for n, qz in named.items() if ".weight_quantizers." not in n and qz.ready}
    for n, qz in named.items():  # weights and uncalibrated quantizers off throughout
        qz.enabled = n in acts

    def error_with(on: set[str]) -> float:
        for n, qz in acts.items():
            qz.enabled = n in on
        return float((predict(q, x, t) - fp_out).pow(2).sum()) / fp_energy

    everything = set(acts)
    total = error_with(everything)
    rows = []
    for n, qz in acts.items():
        alone, without = error_with({n}), error_with(everything - {n})
        layer, tensor = describe_quantizer(n)
        rows.append((alone, total - without, layer, tensor, float(qz.lo.min()), float(qz.hi.max())))
    rows.sort(reverse=True)
    s = sum(r[0] for r in rows)
    print(f"\n## {title}: {len(acts)} activation quantizers, relative noise error with all on {total:.3e}, "
          f"sum of 'alone' {s:.3e}\n")
    print("| rank | layer | tensor | range | alone | share of the sum of 'alone' | all - without |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, (alone, saved, layer, tensor, lo, hi) in enumerate(rows[:TOP], 1):
        print(f"| {k} | {layer} | {tensor} | [{lo:.3g}, {hi:.3g}] | {alone:.3e} | {alone / s:.3f} | {saved:+.3e} |")
    print(f"\nTop 5 share of the sum of 'alone': {sum(r[0] for r in rows[:5]) / s:.3f}; "
          f"top {TOP}: {sum(r[0] for r in rows[:TOP]) / s:.3f}", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    setup = Setup.build(CALIB)
    with torch.no_grad():
        x, t = trajectory_inputs(setup.sampler, setup.fp)
        fp_out = predict(setup.fp, x, t)
    print(f"# small_cifar10 W8A8 activations only (weights FP), range search on NDTC {CALIB} samples (seed {SEED}); "
          f"{len(x)} FP trajectory inputs (noise seeds {SEEDS.start}..{SEEDS.stop - 1}, every {EVERY}th DDIM {STEPS} "
          f"step with t >= {EARLY}); CPU {platform.machine()}, torch {torch.__version__}")
    for split in (False, True):
        qnet = setup.quantized(shortcut_split=split)
        with torch.no_grad():
            table(qnet, fp_out, x, t, "ops.shortcut_split=" + ("true" if split else "false (the default)"))
    print(f"\n# {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
