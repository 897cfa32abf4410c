"""GPU benchmark of the PTQ core on small_cifar10: calibration wall time for 1024 NDTC samples, and the time
to sample quantized images over the time to sample full-precision ones (same seeds, DDIM 100, bf16 autocast).

    python experiments/paper/benchmark.py --out experiments/results/benchmark.json [--compile]

Each timing is wall-clock around CUDA-synchronized work, after a warm-up of the same work (cuDNN autotuning,
the fused fake-quant kernel's compilation). Quantized sampling is timed with the fused kernel (the default)
and with eager PyTorch ops, and the two are checked to give the same images.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from hydra import compose, initialize_config_dir

from ptq4dm.diffusion import Sampler
from ptq4dm.evaluation import SamplingModule
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import recipe_from_config
from ptq4dm.models.factory import load_model
from ptq4dm.quant import set_fused_kernels
from ptq4dm.utils.config import CONF_DIR


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def sample(module: SamplingModule, num_images: int, batch_size: int) -> torch.Tensor:
    batches = [module.predict_step(torch.arange(s, min(s + batch_size, num_images)))["images"]
               for s in range(0, num_images, batch_size)]
    return torch.cat(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--images", type=int, default=2000, help="images per timed sampling run")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--compile", action="store_true",
                        help="also time FP and quantized sampling through torch.compile of the whole network")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides of conf/run.yaml")
    args = parser.parse_args()

    overrides = ["model=small_cifar10", "experiment=paper_scale", "calib=gaussian_ts", "metric=mse", "bits=w8a8",
                 "sampler=ddim", "sampler.steps=100", *args.overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    recipe = recipe_from_config(cfg)
    model = load_model(cfg.model)
    sampler = Sampler(model.scheduler, **cfg.sampler)
    calib_sampler = Sampler(model.scheduler, **recipe.calib_sampler)
    precision = cfg.eval.precision
    fp = SamplingModule(model.unet, sampler, seed=cfg.seed, precision=precision, image_shape=model.image_shape)
    fp.to(device).eval()
    ptq = PTQModule(model.unet, sampler, calib_sampler, recipe, cfg.seed, precision, progress=False,
                    image_shape=model.image_shape).to(device)
    n, bs = args.images, args.batch_size

    with torch.no_grad():
        sample(fp, bs, bs)  # warm-up: cuDNN autotuning, allocator
        calibrations = []
        for _ in range(2):  # the first run also pays one-time costs (kernel selection); both are reported
            seconds, _ = timed(ptq.calibrate, device)
            calibrations.append({"wall_seconds": seconds, **ptq.timings})
        fp_seconds, fp_images = timed(lambda: sample(fp, n, bs), device)
        runs = {}
        for fused in (True, False):
            set_fused_kernels(ptq.unet, fused)
            sample(ptq, bs, bs)  # warm-up (compiles the fused kernel)
            seconds, images = timed(lambda: sample(ptq, n, bs), device)
            runs["fused" if fused else "eager"] = (seconds, images)

        if args.compile:  # both networks compiled whole: the fair comparison when fake quantization fuses
            fp_c = SamplingModule(model.unet, sampler, seed=cfg.seed, precision=precision,
                                  image_shape=model.image_shape, compile=True).to(device).eval()
            sample(fp_c, bs, bs)
            fp_c_seconds, _ = timed(lambda: sample(fp_c, n, bs), device)
            set_fused_kernels(ptq.unet, False)
            ptq.compile = True
            sample(ptq, bs, bs)
            q_c_seconds, _ = timed(lambda: sample(ptq, n, bs), device)

    same = (runs["fused"][1] == runs["eager"][1]).float().mean().item()
    results = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": precision,
        "calibration_samples": cfg.calib.num_samples,
        "calibration_batch_size": cfg.calib.batch_size,
        "calibration": calibrations,
        "sampler": f"{cfg.sampler.name}-{cfg.sampler.steps}",
        "sampling_images": n,
        "sampling_batch_size": bs,
        "sampling_seconds_fp": fp_seconds,
        "sampling_seconds_quantized_fused": runs["fused"][0],
        "sampling_seconds_quantized_eager": runs["eager"][0],
        "ratio_fused": runs["fused"][0] / fp_seconds,
        "ratio_eager": runs["eager"][0] / fp_seconds,
        "fused_equals_eager_pixel_fraction": same,
        **({"sampling_seconds_fp_compiled": fp_c_seconds, "sampling_seconds_quantized_compiled": q_c_seconds,
            "ratio_compiled": q_c_seconds / fp_c_seconds} if args.compile else {}),
        "quantized_vs_fp_pixel_mae": (runs["fused"][1].float() - fp_images.float()).abs().mean().item(),
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
