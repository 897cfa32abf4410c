"""The LightningModule of a PTQ job: calibrate a quantized copy of the model, then sample it.

Calibration goes through the calibration engine (``ptq4dm.engine``, the same one ``ptq4dm.quantize`` uses):
build the calibration set with the full-precision model and the calibration sampler, place quantizers in
execution order, search ranges, reconstruct if asked. A job calibrates (or restores its saved calibration)
before sampling; each prediction batch then samples the quantized model from per-image seeds, exactly like
the full-precision run, so the two image sets pair up image by image.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

from ptq4dm.calibration import RangeChoice
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.engine import FullPrecision, PTQMethod, calibrate_network, calibrate_sampler_outputs
from ptq4dm.evaluation.sampling import SamplingModule
from ptq4dm.experiment.recipe import PTQRecipe
from ptq4dm.quant import load_quantized, set_fused_kernels
from ptq4dm.quant.sampler_outputs import SamplerOutputQuantizer
from ptq4dm.reconstruction import UnitReport


class PTQModule(SamplingModule):
    def __init__(self, fp_unet: nn.Module, sampler: Sampler, calib_sampler: Sampler, recipe: PTQRecipe,
                 seed: int = 0, precision: str = "fp32", calib_images: torch.Tensor | None = None,
                 progress: bool = True, image_shape: tuple[int, int, int] | None = None, compile: bool = False,
                 decoder: nn.Module | None = None, conditioner=None):
        if recipe.quantize_decoder and decoder is None:
            raise ValueError("ops.decoder=true: this model samples pixels and has no VAE decoder to quantize; "
                             "allowed only with latent pipelines")
        sampled_decoder = copy.deepcopy(decoder).eval() if recipe.quantize_decoder else decoder  # FP run keeps its
        # The network sampled: a full-precision copy until calibrate() or restore() quantizes it in place.
        super().__init__(copy.deepcopy(fp_unet).eval(), sampler, seed=seed, precision=precision,
                         image_shape=image_shape, compile=compile, decoder=sampled_decoder, conditioner=conditioner)
        self.fp_unet, self.fp_decoder = fp_unet.eval(), decoder
        self.calib_sampler, self.recipe, self.calib_images, self.progress = calib_sampler, recipe, calib_images, progress
        self.ranges: list[RangeChoice] | None = None
        self.reconstruction: list[UnitReport] = []
        self.full_precision: list[FullPrecision] = []
        self.timings: dict[str, float] = {}
        if recipe.quant.sampler_outputs:
            self.output_quantizer = SamplerOutputQuantizer(recipe.quant.sampler_outputs, recipe.quant.act_spec())

    @property
    def quantized_decoder(self) -> nn.Module | None:
        """The VAE's decoder network inside ``self.decoder`` when the job quantizes it (``ops.decoder``)."""
        return self.decoder.autoencoder.decoder if self.recipe.quantize_decoder else None

    def on_predict_start(self) -> None:
        if self.ranges is None:  # a job calibrates (or restores) before sampling; this serves other callers
            self.calibrate()

    def _quantized(self) -> None:
        if self.compile:  # the whole network is compiled: its fake-quant ops fuse into the graph, no kernel of their own
            set_fused_kernels(self.unet, False)

    def restore(self, folder, ranges: list[RangeChoice], timings: dict[str, float]) -> None:
        """Take this job's saved calibration (``quantization.safetensors`` in ``folder``) instead of calibrating:
        a resumed job samples on with exactly the state its first images were made with."""
        load_quantized(self.unet, folder, extra=self.output_quantizer, decoder=self.quantized_decoder)
        self._quantized()
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
        result = calibrate_network(self.unet, self.fp_unet, calib_set, self.recipe.method, self.in_precision,
                                   self.recipe.calibration.batch_size, self.progress, lambda: self.autocast(device))
        self.ranges, self.reconstruction = list(result.ranges), result.reconstruction
        self.full_precision = result.full_precision
        if self.output_quantizer is not None:
            self.ranges += self.calibrate_sampler_outputs(device)
        if self.quantized_decoder is not None:
            self.ranges += self.calibrate_decoder(device)
        self._quantized()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.timings = {"calibration_seconds": t2 - t0, "calibration_set_seconds": t1 - t0, **result.timings}
        self.calibration_set = calib_set
        return self.ranges

    def in_precision(self, network: nn.Module):
        """``network`` as a denoiser in the evaluation's precision (bf16 autocast on CUDA by default), so the
        trajectories and activations calibration sees are those the quantized network meets when sampling."""

        def run(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
            t = t.expand(x.shape[0]) if t.ndim == 0 else t
            with self.autocast(x.device):
                out = network(x, t) if cond is None else network(x, t, cond)
            return (out.sample if hasattr(out, "sample") else out).float()

        return run

    def calibrate_decoder(self, device, max_latents: int = 64) -> list[RangeChoice]:
        """The VAE decoder's ranges, from the latents that full-precision sampling ends with (``ops.decoder``)."""
        n = min(self.recipe.calibration.num_samples, max_latents)
        generators = seeded_generators(self.recipe.calibration.seed + 2, range(n))
        noise = self.sampler.initial_noise(generators, self.image_shape, device)
        conditioning = None if self.conditioner is None else self.conditioner(torch.arange(n))
        latents = self.sampler.sample(self.in_precision(self.fp_unet), noise, generators, conditioning=conditioning,
                                      clip=False)
        quantized = self.quantized_decoder

        def forward(network):  # the decoder network inside its LatentDecoder (the sampled one, or the FP one)
            owner = self.decoder if network is quantized else self.fp_decoder
            return lambda z, t, cond: owner(z)

        method = PTQMethod(self.recipe.quant.for_decoder(), self.recipe.search, None)
        result = calibrate_network(quantized, self.fp_decoder.autoencoder.decoder, CalibrationSet.of_inputs(latents),
                                   method, forward, self.recipe.calibration.batch_size, self.progress)
        self.full_precision += [dataclasses.replace(f, name=f"vae.decoder.{f.name}") for f in result.full_precision]
        return [dataclasses.replace(r, quantizer=f"vae.decoder.{r.quantizer}") for r in result.ranges]

    def calibrate_sampler_outputs(self, device, max_trajectories: int = 64) -> list[RangeChoice]:
        """Ranges of the sampler's mean, variance and x_{t-1}, from full-precision trajectories."""
        return calibrate_sampler_outputs(self.output_quantizer, self.sampler, self.in_precision(self.fp_unet),
                                         self.recipe.search, self.image_shape, device,
                                         min(self.recipe.calibration.num_samples, max_trajectories),
                                         self.recipe.calibration.seed + 1, self.conditioner)
