"""The LightningModule of a PTQ job: calibrate a quantized copy of the model, then sample it.

Calibration runs once per process when prediction starts (the model is on its device by then): build the
calibration set with the full-precision model and the calibration sampler, observe, search ranges. Each
prediction batch then samples the quantized model from per-image seeds, exactly like the full-precision run,
so the two image sets pair up image by image.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

from ptq4dm.api import as_denoiser
from ptq4dm.calibration import RangeChoice, calibrate_
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.calibration.observer import ValueSample
from ptq4dm.calibration.search import search_range
from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.evaluation.sampling import SamplingModule
from ptq4dm.experiment.recipe import PTQRecipe
from ptq4dm.quant import quantize_, restore_quantized, set_fused_kernels
from ptq4dm.quant.sampler_outputs import SamplerOutputQuantizer


class PTQModule(SamplingModule):
    def __init__(self, fp_unet: nn.Module, sampler: Sampler, calib_sampler: Sampler, recipe: PTQRecipe,
                 seed: int = 0, precision: str = "fp32", calib_images: torch.Tensor | None = None,
                 progress: bool = True, image_shape: tuple[int, int, int] | None = None, compile: bool = False,
                 decoder: nn.Module | None = None, conditioner=None):
        quantized = quantize_(copy.deepcopy(fp_unet).eval(), recipe.quant)
        quantized_decoder = None
        if recipe.quantize_decoder:
            if decoder is None:
                raise ValueError("ops.decoder=true: this model samples pixels and has no VAE decoder to quantize; "
                                 "allowed only with latent pipelines")
            decoder = copy.deepcopy(decoder).eval()  # the FP run keeps the original
            quantized_decoder = quantize_(decoder.autoencoder.decoder, recipe.quant.for_decoder())
        super().__init__(quantized, sampler, seed=seed, precision=precision, image_shape=image_shape,
                         compile=compile, decoder=decoder, conditioner=conditioner)
        if compile:  # the whole network is compiled: its fake-quant ops fuse into the graph, no kernel of their own
            set_fused_kernels(quantized, False)
        self.fp_unet = fp_unet.eval()
        self.calib_sampler, self.recipe, self.calib_images, self.progress = calib_sampler, recipe, calib_images, progress
        self.quantized_decoder = quantized_decoder  # the VAE's decoder network inside self.decoder, or None
        self.ranges: list[RangeChoice] | None = None
        self.timings: dict[str, float] = {}
        if recipe.quant.sampler_outputs:
            self.output_quantizer = SamplerOutputQuantizer(recipe.quant.sampler_outputs, recipe.quant.act_spec())

    def on_predict_start(self) -> None:
        if self.ranges is None:  # a job calibrates (or restores) before sampling; this serves other callers
            self.calibrate()

    def restore(self, folder, ranges: list[RangeChoice], timings: dict[str, float]) -> None:
        """Take this job's saved calibration (``quantization.safetensors`` in ``folder``) instead of calibrating:
        a resumed job samples on with exactly the state its first images were made with."""
        restore_quantized(self.unet, folder, extra=self.output_quantizer, decoder=self.quantized_decoder)
        self.ranges, self.timings = ranges, dict(timings)

    @torch.no_grad()
    def calibrate(self) -> list[RangeChoice]:
        device = next(self.unet.parameters()).device
        t0 = time.perf_counter()
        # Calibration sample i is conditioned as image i is (a label or prompt cycled over the indices).
        conditioning = None if self.conditioner is None else \
            self.conditioner(torch.arange(self.recipe.calibration.num_samples))
        calib_set = self.recipe.calibration.build(self.in_precision(self.fp_unet), self.calib_sampler,
                                                  self.image_shape, device, self.calib_images, self.progress,
                                                  conditioning)
        t1 = time.perf_counter()
        self.ranges = calibrate_(self.unet, self.in_precision(self.unet), calib_set, self.recipe.search,
                                 self.recipe.calibration.batch_size, self.progress)
        if self.output_quantizer is not None:
            self.ranges += self.calibrate_sampler_outputs(device)
        if self.quantized_decoder is not None:
            self.ranges += self.calibrate_decoder(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.timings = {"calibration_seconds": t2 - t0, "calibration_set_seconds": t1 - t0,
                        "range_search_seconds": t2 - t1}
        self.calibration_set = calib_set
        return self.ranges

    def in_precision(self, network: nn.Module):
        """``network`` as a denoiser in the evaluation's precision (bf16 autocast on CUDA by default), so the
        trajectories and activations calibration sees are those the quantized network meets when sampling."""
        denoise = as_denoiser(network)

        def run(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
            with self.autocast(x.device):
                return denoise(x, t, cond).float()

        return run

    def calibrate_decoder(self, device, max_latents: int = 64) -> list[RangeChoice]:
        """The VAE decoder's ranges, from the latents that full-precision sampling ends with (``ops.decoder``)."""
        n = min(self.recipe.calibration.num_samples, max_latents)
        generators = seeded_generators(self.recipe.calibration.seed + 2, range(n))
        noise = self.sampler.initial_noise(generators, self.image_shape, device)
        conditioning = None if self.conditioner is None else self.conditioner(torch.arange(n))
        latents = self.sampler.sample(self.in_precision(self.fp_unet), noise, generators, conditioning=conditioning,
                                      clip=False)
        rows = calibrate_(self.quantized_decoder, lambda z, t, cond: self.decoder(z), CalibrationSet.of_inputs(latents),
                          self.recipe.search, self.recipe.calibration.batch_size, self.progress)
        return [dataclasses.replace(r, quantizer=f"vae.decoder.{r.quantizer}") for r in rows]

    def calibrate_sampler_outputs(self, device, max_trajectories: int = 64) -> list[RangeChoice]:
        """Ranges of the sampler's mean, variance and x_{t-1}, from full-precision trajectories."""
        quantizers = self.output_quantizer.quantizers
        for i, q in enumerate(quantizers.values()):
            q.observer = ValueSample(self.recipe.search.max_values, seed=i)
        n = min(self.recipe.calibration.num_samples, max_trajectories)
        generators = seeded_generators(self.recipe.calibration.seed + 1, range(n))
        noise = self.sampler.initial_noise(generators, self.image_shape, device)
        conditioning = None if self.conditioner is None else self.conditioner(torch.arange(n))
        try:
            self.sampler.sample(self.in_precision(self.fp_unet), noise, generators,
                                output_quantizer=self.output_quantizer, conditioning=conditioning)
        finally:
            observers = {name: q.observer for name, q in quantizers.items()}
            for q in quantizers.values():
                q.observer = None
        choices = []
        for name, q in quantizers.items():
            obs = observers[name]
            search = self.recipe.search
            lo, hi, score, base = search_range(obs.values(), obs.min.reshape(1), obs.max.reshape(1), q, search.metric,
                                               search.num_candidates, search.independent_ends)
            q.set_range(lo, hi)
            choices.append(RangeChoice(f"sampler.{name}", "sampler output", q.spec.bits, float(lo), float(hi),
                                       float(obs.min), float(obs.max), None if score is None else float(score),
                                       None if base is None else float(base)))
        return choices
