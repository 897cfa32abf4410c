"""A CPU proxy that follows whole trajectories: calibrate small_cifar10 with each variant, sample the same seeds
with the FP and the quantized network (DDIM 100, as the GPU runs), and measure how far the quantized images drift
from the FP ones: PSNR to FP on uint8 images (the number `ptq4dm.run` reports as psnr_vs_fp), the mean colour
shift, and with ``--fid`` FID against CIFAR-10 and against the FP images.

    python experiments/paper/image_drift.py --data-root ../shared/data/cifar10 > experiments/results/image_drift_cpu.md
    python experiments/paper/image_drift.py --data-root ../shared/data/cifar10 --precision bf16 \
        --calib-samples 1024 --only "gaussian_ts, joint ends" "gaussian_ts (NDTC, trajectory)"

``--precision bf16`` autocasts the network on the CPU as the GPU runs do on CUDA (the library itself autocasts
on CUDA only). Calibration sets are built once per calibration preset and shared by the variants that use it.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from hydra import compose, initialize_config_dir

from ptq4dm.calibration import calibrate_
from ptq4dm.data import load_cifar10
from ptq4dm.diffusion import Sampler
from ptq4dm.utils.precision import DTYPES as _DTYPES
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.metrics import make_extractor
from ptq4dm.metrics.scoring import image_statistics, pixel_errors, reference_from_config, score
from ptq4dm.models.factory import load_model
from ptq4dm.utils.config import CONF_DIR

BASE = ["model=small_cifar10", "bits=w8a8", "sampler.steps=100"]
VARIANTS = {
    "gaussian_ts (NDTC, trajectory)": ["calib=gaussian_ts"],
    "gaussian_ts, joint ends": ["calib=gaussian_ts", "metric.independent_ends=false"],
    "random_ts (U(0,T), trajectory)": ["calib=random_ts"],
    "forward_ts (U(0,T), forward-noised)": ["calib=forward_ts"],
    "forward_ts, joint ends": ["calib=forward_ts", "metric.independent_ends=false"],
    "raw (U(0,T), raw images)": ["calib=raw"],
    "gaussian_ts, minmax": ["calib=gaussian_ts", "metric=minmax"],
    "gaussian_ts, w4a8": ["calib=gaussian_ts", "bits=w4a8"],
    "gaussian_ts, w4a8, joint ends": ["calib=gaussian_ts", "bits=w4a8", "metric.independent_ends=false"],
}


class Module(PTQModule):
    """PTQModule whose ``precision`` applies on the CPU too (the library autocasts on CUDA only), so that the
    GPU runs' bf16 autocast can be followed here."""

    def autocast(self, device):
        dtype = _DTYPES[self.precision]
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def sample(self, num_images: int, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self.predict_step(idx)["images"] for idx in torch.arange(num_images).split(batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="CIFAR-10 for the real-image sources")
    parser.add_argument("--images", type=int, default=32, help="images sampled per variant")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--precision", default="fp32", choices=sorted(_DTYPES), help="autocast dtype of the network")
    parser.add_argument("--fid", action="store_true", help="also FID against CIFAR-10 (train) and against FP")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = BASE + [f"calib.num_samples={args.calib_samples}", f"data.root={args.data_root}"]
    print(f"# {' '.join(base)}; {args.images} images, seeds 0..{args.images - 1}; {args.precision} on CPU "
          f"({platform.machine()}), torch {torch.__version__}")
    fid_head = "FID | FID to FP | " if args.fid else ""
    print(f"| variant | {fid_head}PSNR to FP (dB) | mean shift R, G, B (levels) | per-image shift spread | "
          f"contrast vs FP | clipped activation quantizers | calibration (s) | sampling (s) |\n"
          f"| --- | {'--- | --- | ' if args.fid else ''}--- | --- | --- | --- | --- | --- | --- |", flush=True)
    images = load_cifar10(args.data_root, "train").images
    fp_images, fp_stats, calib_sets, notes = None, None, {}, []
    extractor = make_extractor("cpu") if args.fid else None
    for name, extra in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("run", overrides=base + extra)
        recipe, model = recipe_from_config(cfg), load_model(cfg.model)
        sampler = Sampler(model.scheduler, **cfg.sampler)
        module = Module(model.unet, sampler, sampler, recipe, cfg.seed, args.precision, progress=False,
                        image_shape=model.image_shape, calib_images=images)
        if fp_images is None:  # the FP network samples through the same code, quantizers absent
            t0 = time.perf_counter()
            fp_images = Module(model.unet, sampler, sampler, recipe, cfg.seed, args.precision, progress=False,
                               image_shape=model.image_shape).sample(args.images)
            fp_seconds = time.perf_counter() - t0
            if args.fid:
                reference = reference_from_config(cfg, extractor)
                fp_stats = image_statistics(fp_images, extractor, cfg.metrics.batch_size, "full precision")
                fp_fid = score(fp_stats, reference, cfg)["fid"]
                print(f"| full precision | {fp_fid:.2f} | | | | | | | | {fp_seconds:.0f} |", flush=True)
        t0 = time.perf_counter()
        key = cfg.calib.name
        if key not in calib_sets:
            calib_sets[key] = recipe.calibration.build(module.in_precision(module.fp_unet), sampler,
                                                       model.image_shape, "cpu", images, progress=False)
            peak = calib_sets[key].x.flatten(1).abs().amax(dim=1)  # one far-out sample stretches observed ranges
            top = peak.topk(3)
            notes.append(f"calib={key}: largest |x| of a calibration input: " + ", ".join(
                f"{v:.1f} (sample {i}, t={int(calib_sets[key].t[i])})"
                for v, i in zip(top.values.tolist(), top.indices.tolist())) + f"; median {float(peak.median()):.1f}")
        module.ranges = calibrate_(module.unet, module.in_precision(module.unet), calib_sets[key], recipe.search,
                                   recipe.calibration.batch_size, progress=False)
        t1 = time.perf_counter()
        q_images = module.sample(args.images)
        t2 = time.perf_counter()
        errors = pixel_errors(q_images, fp_images)
        shift = q_images.float() - fp_images.float()  # a bias the network repeats at every step shows up here
        rgb = ", ".join(f"{v:+.2f}" for v in shift.mean(dim=(0, 2, 3)).tolist())
        contrast = float(q_images.float().std() / fp_images.float().std())
        acts = [r for r in module.ranges if r.tensor.startswith("input")]
        clipped = sum(r.hi < 0.99 * r.observed_hi for r in acts)
        fids = ""
        if args.fid:
            q_stats = image_statistics(q_images, extractor, cfg.metrics.batch_size, "quantized")
            fids = f"{score(q_stats, reference, cfg)['fid']:.2f} | {score(q_stats, fp_stats, cfg)['fid']:.2f} | "
        print(f"| {name} | {fids}{errors['psnr_vs_fp']:.2f} | {rgb} | {float(shift.mean(dim=(1, 2, 3)).std()):.2f} | "
              f"{contrast:.4f} | {clipped}/{len(acts)} | {t1 - t0:.0f} | {t2 - t1:.0f} |", flush=True)
    print("\n" + "\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
