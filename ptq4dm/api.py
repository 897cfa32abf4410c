"""Quantize any epsilon-prediction network without Hydra, in the shape of ``quantize_(model, config)``.

    import ptq4dm
    qmodel, report = ptq4dm.quantize(unet, scheduler, ptq4dm.QuantConfig(weight_bits=8, act_bits=8))

``model(x, t)`` (or ``model(x, t, cond)``) must return the predicted noise, as a tensor or as an object with
a ``.sample`` tensor (diffusers models). The model is copied; the original stays in full precision.

A conditional model (a UNet2DConditionModel, a class-conditional UNet2DModel) is calibrated with
``conditioning=Conditioning(cond, uncond, guidance_scale)``, one row per calibration sample. Only ``model`` is
quantized: the text encoder that made ``cond`` and a latent model's VAE are separate modules and stay in full
precision (quantize them with ``quantize_`` if wanted).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq4dm.calibration import CalibrationRecipe, ChannelBalance, Gaussian, RangeChoice, RangeSearch, Trajectory
from ptq4dm.diffusion import Conditioning, Sampler
from ptq4dm.engine import PTQMethod, calibrate_network, calibrate_sampler_outputs
from ptq4dm.quant import QuantConfig
from ptq4dm.quant.sampler_outputs import SamplerOutputQuantizer
from ptq4dm.reconstruction import Reconstruction
from ptq4dm.utils.precision import autocast, denoiser


def as_denoiser(model: nn.Module):
    """``f(x, t[, cond]) -> eps`` as a plain tensor, with a scalar t broadcast over the batch."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = model(x, t) if cond is None else model(x, t, cond)
        return out.sample if hasattr(out, "sample") else out

    return denoise


@dataclass
class QuantizationReport:
    ranges: list[RangeChoice] = field(default_factory=list)
    calibration_seconds: float = 0.0
    calibration_set_seconds: float = 0.0
    num_calibration_samples: int = 0  # network inputs: two per sample under classifier-free guidance
    reconstruction: list = field(default_factory=list)  # one UnitReport per reconstructed unit
    full_precision: list = field(default_factory=list)  # what stays in full precision, and why
    sampler_outputs: SamplerOutputQuantizer | None = None  # pass to Sampler.sample(output_quantizer=...)
    timings: dict = field(default_factory=dict)


def quantize(model: nn.Module, scheduler, config: QuantConfig | None = None,
             calibration: CalibrationRecipe | None = None, search: RangeSearch | None = None,
             sampler: Sampler | None = None, image_shape: tuple[int, int, int] | None = None,
             images: torch.Tensor | None = None, progress: bool = False,
             conditioning: Conditioning | None = None, reconstruction: Reconstruction | None = None,
             precision: str = "bf16", balance: ChannelBalance | None = None) -> tuple[nn.Module, QuantizationReport]:
    """A calibrated, fake-quantized copy of ``model``, by the same calibration engine as ``ptq4dm.run``.

    ``scheduler`` is the model's diffusers training scheduler; ``sampler`` (default DDIM, 100 steps) is the
    one the model will be sampled with, whose trajectory and time steps the calibration set follows.
    ``conditioning`` (one row per calibration sample; see ``Conditioning``) is what a conditional model is
    sampled and calibrated with; under classifier-free guidance each sample gives two calibration inputs.
    ``reconstruction`` (``ptq4dm.reconstruction``) learns rounding after the range search. ``precision`` is
    the autocast dtype on CUDA, as ``eval.precision`` (the CPU computes in float32). ``balance``
    (``ChannelBalance``, SmoothQuant) moves per-channel activation spread into the weights before the ranges. With
    ``config.sampler_outputs`` the report's ``sampler_outputs`` quantizes the sampler's own outputs.
    """
    config = config or QuantConfig()
    calibration = calibration or CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory())
    sampler = sampler or Sampler(scheduler, "ddim", steps=100)
    device = next(model.parameters()).device
    if image_shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise ValueError("image_shape=(C, H, W) is needed for a model without a diffusers config")
        size = cfg.sample_size  # an int, or (H, W) for some diffusers models
        image_shape = (cfg.in_channels, *((size, size) if isinstance(size, int) else size))
    method = PTQMethod(config, search or RangeSearch(), reconstruction, balance)
    if reconstruction is not None:  # before the calibration set is built
        reconstruction.check(calibration.num_samples)
        reconstruction.check_bits(config.weight_bits, config.act_bits)
        reconstruction.check_network(model)
    forward = lambda network: denoiser(network, precision)  # noqa: E731

    t0 = time.perf_counter()
    with torch.no_grad():
        calib_set = calibration.build(forward(model), sampler, image_shape, device, images, progress, conditioning)
    t1 = time.perf_counter()
    result = calibrate_network(copy.deepcopy(model).eval(), model, calib_set, method, forward,
                               calibration.batch_size, progress, lambda: autocast(precision, device))
    outputs, ranges = None, list(result.ranges)
    if config.sampler_outputs:
        outputs = SamplerOutputQuantizer(config.sampler_outputs, config.act_spec()).to(device)
        ranges += calibrate_sampler_outputs(outputs, sampler, forward(model), method.search, image_shape, device,
                                            min(calibration.num_samples, 64), calibration.seed + 1)
    t2 = time.perf_counter()
    return result.network, QuantizationReport(ranges, t2 - t0, t1 - t0, len(calib_set), result.reconstruction,
                                              result.full_precision, outputs, result.timings)
