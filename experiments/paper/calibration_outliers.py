"""Which calibration inputs stretch the observed ranges, and what that does to the chosen ranges.

Builds the NDTC calibration set of `small_cifar10` as the GPU jobs do (1024 samples, DDIM 100, seed 1234), lists
the inputs with the largest |x|, follows the FP trajectory of the most extreme one step by step (fp32 and bf16),
and compares the ranges the search chooses from the whole set and from the set without that input, with one
shrink factor for both ends and with each end searched on its own.

    python experiments/paper/calibration_outliers.py --save calib_ndtc1024_bf16.pt \
        > experiments/results/calibration_outliers_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ptq4dm.calibration import calibrate_
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.utils.precision import DTYPES as _DTYPES
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR

from image_drift import Module  # the script beside this one: PTQModule with its autocast on the CPU too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--precision", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--save", help="keep the calibration set in this file and reuse it when it exists")
    parser.add_argument("--rows", type=int, default=12, help="quantizers listed, most changed first")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["model=small_cifar10", "sampler.steps=100",
                                        f"calib.num_samples={args.samples}"])
    recipe, model = recipe_from_config(cfg), load_model(cfg.model)
    sampler = Sampler(model.scheduler, **cfg.sampler)

    def module(precision: str = args.precision) -> Module:
        return Module(model.unet, sampler, sampler, recipe, cfg.seed, precision, progress=False,
                      image_shape=model.image_shape)

    if args.save and Path(args.save).is_file():
        calib = CalibrationSet(**torch.load(args.save, weights_only=True))
    else:
        m = module()
        calib = recipe.calibration.build(m.in_precision(m.fp_unet), sampler, model.image_shape, "cpu", progress=False)
        if args.save:
            torch.save({"x": calib.x, "t": calib.t, "step_index": calib.step_index}, args.save)
    print(f"# NDTC calibration set of small_cifar10: {len(calib)} samples, DDIM 100, seed {recipe.calibration.seed}, "
          f"{args.precision} on the CPU, torch {torch.__version__}\n")

    peak = calib.x.flatten(1).abs().amax(dim=1)
    top = peak.topk(5)
    print("Largest |x| of a calibration input (sample, t): " + ", ".join(
        f"{v:.2f} ({i}, {int(calib.t[i])})" for v, i in zip(top.values.tolist(), top.indices.tolist()))
          + f"; median over samples {float(peak.median()):.2f}.\n")

    worst = int(top.indices[0])
    print(f"The FP trajectory of sample {worst} (noise seed ({recipe.calibration.seed}, {worst})): max |x_t| at every "
          "5th step\n\n| t | " + " | ".join(("fp32", args.precision)) + " |\n| --- | --- | --- |")
    traces = {}
    for precision in ("fp32", args.precision):
        m, trace = module(precision), {}
        generators = seeded_generators(recipe.calibration.seed, [worst])
        sampler.sample(m.in_precision(m.fp_unet), sampler.initial_noise(generators, model.image_shape, "cpu"),
                       generators, on_step=lambda i, t, x: trace.__setitem__(int(t), float(x.abs().max())))
        traces[precision] = trace
    for t in list(traces["fp32"])[::5]:
        print(f"| {t} | {traces['fp32'][t]:.2f} | {traces[args.precision][t]:.2f} |")

    keep = torch.arange(len(calib)) != worst
    without = CalibrationSet(x=calib.x[keep], t=calib.t[keep], step_index=calib.step_index[keep])
    chosen = {}
    for independent in (False, True):
        search = dataclasses.replace(recipe.search, independent_ends=independent)
        for name, subset in (("all", calib), ("without", without)):
            m = module()
            rows = calibrate_(m.unet, m.in_precision(m.unet), subset, search, recipe.calibration.batch_size,
                              progress=False)
            chosen[independent, name] = {r.quantizer: r for r in rows if r.tensor == "input"}
    base = chosen[False, "all"]
    order = sorted(base, key=lambda q: -base[q].observed_hi / max(chosen[False, "without"][q].observed_hi, 1e-9))
    print(f"\nActivation ranges [lo, hi] (observed maximum), input quantizers whose observed maximum sample {worst} "
          "stretches most:\n\n| quantizer | observed max: all / without | one factor: all | one factor: without | "
          "each end: all | each end: without |\n| --- | --- | --- | --- | --- | --- |")
    for q in order[: args.rows]:
        cells = [f"[{chosen[k][q].lo:.3f}, {chosen[k][q].hi:.3f}]"
                 for k in ((False, "all"), (False, "without"), (True, "all"), (True, "without"))]
        print(f"| {q} | {base[q].observed_hi:.2f} / {chosen[False, 'without'][q].observed_hi:.2f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
