"""The LightningModule of a PTQ job: calibrate a quantized copy of the model, then sample it.

Calibration runs once per process when prediction starts (the model is on its device by then): build the
calibration set with the full-precision model and the calibration sampler, observe, search ranges. Each
prediction batch then samples the quantized model from per-image seeds, exactly like the full-precision run,
so the two image sets pair up image by image.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ptq4dm.api import as_denoiser
from ptq4dm.calibration import RangeChoice, calibrate_
from ptq4dm.diffusion import Sampler
from ptq4dm.evaluation.sampling import SamplingModule
from ptq4dm.experiment.recipe import PTQRecipe
from ptq4dm.quant import quantize_


class PTQModule(SamplingModule):
    def __init__(self, fp_unet: nn.Module, sampler: Sampler, calib_sampler: Sampler, recipe: PTQRecipe,
                 seed: int = 0, precision: str = "fp32", calib_images: torch.Tensor | None = None,
                 progress: bool = True):
        quantized = quantize_(copy.deepcopy(fp_unet).eval(), recipe.quant)
        super().__init__(quantized, sampler, seed=seed, precision=precision)
        self.fp_unet = fp_unet.eval()
        self.calib_sampler, self.recipe, self.calib_images, self.progress = calib_sampler, recipe, calib_images, progress
        self.ranges: list[RangeChoice] | None = None
        self.timings: dict[str, float] = {}

    def on_predict_start(self) -> None:
        if self.ranges is None:
            self.calibrate()

    @torch.no_grad()
    def calibrate(self) -> list[RangeChoice]:
        device = next(self.unet.parameters()).device
        t0 = time.perf_counter()
        calib_set = self.recipe.calibration.build(as_denoiser(self.fp_unet), self.calib_sampler, self.image_shape,
                                                  device, self.calib_images, self.progress)
        t1 = time.perf_counter()
        self.ranges = calibrate_(self.unet, as_denoiser(self.unet), calib_set, self.recipe.search,
                                 self.recipe.calibration.batch_size, self.progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.timings = {"calibration_seconds": t2 - t0, "calibration_set_seconds": t1 - t0,
                        "range_search_seconds": t2 - t1}
        self.calibration_set = calib_set
        return self.ranges
