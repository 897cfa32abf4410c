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
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq4dm.calibration import CalibrationRecipe, Gaussian, RangeChoice, RangeSearch, Trajectory, calibrate_
from ptq4dm.diffusion import Conditioning, Sampler
from ptq4dm.quant import QuantConfig, quantize_


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


def quantize(model: nn.Module, scheduler, config: QuantConfig | None = None,
             calibration: CalibrationRecipe | None = None, search: RangeSearch | None = None,
             sampler: Sampler | None = None, image_shape: tuple[int, int, int] | None = None,
             images: torch.Tensor | None = None, progress: bool = False,
             conditioning: Conditioning | None = None) -> tuple[nn.Module, QuantizationReport]:
    """A calibrated, fake-quantized copy of ``model``.

    ``scheduler`` is the model's diffusers training scheduler; ``sampler`` (default DDIM, 100 steps) is the
    one the model will be sampled with, whose trajectory and time steps the calibration set follows.
    ``conditioning`` (one row per calibration sample; see ``Conditioning``) is what a conditional model is
    sampled and calibrated with; under classifier-free guidance each sample gives two calibration inputs.
    """
    import time

    config = config or QuantConfig()
    calibration = calibration or CalibrationRecipe(Gaussian(0.4, 0.4), Trajectory())
    search = search or RangeSearch()
    sampler = sampler or Sampler(scheduler, "ddim", steps=100)
    device = next(model.parameters()).device
    if image_shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise ValueError("image_shape=(C, H, W) is needed for a model without a diffusers config")
        size = cfg.sample_size  # an int, or (H, W) for some diffusers models
        image_shape = (cfg.in_channels, *((size, size) if isinstance(size, int) else size))

    t0 = time.perf_counter()
    with torch.no_grad():
        calib_set = calibration.build(as_denoiser(model), sampler, image_shape, device, images, progress,
                                      conditioning)
    t1 = time.perf_counter()
    qmodel = quantize_(copy.deepcopy(model).eval(), config)
    ranges = calibrate_(qmodel, as_denoiser(qmodel), calib_set, search, calibration.batch_size, progress)
    t2 = time.perf_counter()
    return qmodel, QuantizationReport(ranges, t2 - t0, t1 - t0, len(calib_set))
