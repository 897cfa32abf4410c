"""Quantizing what the sampler computes (PTQ4DM Table 1): the posterior mean, its variance and x_{t-1}.

A step of DDPM or DDIM is x_{t-1} = mean + sigma * z. The scheduler's own step gives x_{t-1}; the noise z
is drawn again from copies of the per-image generators (the same draws the step made), so mean and sigma
are recovered exactly and can be quantized before x_{t-1} is put back together. The step converts the
network's prediction (epsilon, v_prediction or sample) itself, so every prediction type works the same way.
improved-diffusion's step (ImprovedDDPMScheduler, converted iddpm models) gives its mean and per-element
variance exp(log-variance) itself.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ptq4dm.diffusion.improved_ddpm import ImprovedDDPMScheduler
from ptq4dm.quant.config import SAMPLER_OUTPUTS
from ptq4dm.quant.quantizer import Quantizer, QuantSpec


def _copies(generators: list[torch.Generator]) -> list[torch.Generator]:
    out = []
    for g in generators:
        c = torch.Generator(device=g.device)
        c.set_state(g.get_state())
        out.append(c)
    return out


def noise_std(scheduler, t: torch.Tensor, eta: float) -> float:
    """sigma of the step at t (0 where the step adds no noise)."""
    if isinstance(scheduler, DDIMScheduler):
        if eta <= 0:
            return 0.0
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return float(eta * scheduler._get_variance(t, prev_t) ** 0.5)
    if isinstance(scheduler, DDPMScheduler):
        if int(t) == 0:
            return 0.0
        if scheduler.config.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"sampler_outputs: DDPM variance_type={scheduler.config.variance_type!r} is not "
                             "supported (fixed_small, fixed_large)")
        return float(scheduler._get_variance(t) ** 0.5)
    raise ValueError(f"ops.sampler_outputs needs sampler ddim or ddpm, not {type(scheduler).__name__}")


class SamplerOutputQuantizer(nn.Module):
    def __init__(self, names: tuple[str, ...], spec: QuantSpec):
        super().__init__()
        unknown = set(names) - set(SAMPLER_OUTPUTS)
        if unknown:
            raise ValueError(f"sampler outputs {sorted(unknown)}: allowed are {list(SAMPLER_OUTPUTS)}")
        self.quantizers = nn.ModuleDict({name: Quantizer(spec) for name in names})

    def step(self, scheduler, prediction: torch.Tensor, t: torch.Tensor, x: torch.Tensor, step_kwargs: dict,
             generators: list[torch.Generator] | None) -> torch.Tensor:
        """x_{t-1} of the scheduler's step from the network's ``prediction`` (what its prediction_type says),
        with the mean, variance and x_{t-1} quantized as configured."""
        if isinstance(scheduler, ImprovedDDPMScheduler):
            return self._improved_diffusion_step(scheduler, prediction, t, x, generators)
        q = self.quantizers
        std = noise_std(scheduler, t, step_kwargs.get("eta", 0.0))
        z = None
        if std > 0:
            if generators is None:
                raise ValueError("sampler output quantization of a stochastic step needs per-image generators")
            z = randn_tensor(x.shape, generator=_copies(generators), device=x.device, dtype=x.dtype)
        kwargs = {**step_kwargs, "generator": generators} if generators is not None else step_kwargs
        prev = scheduler.step(prediction, t, x, **kwargs).prev_sample
        if z is None:
            mean = q["mean"](prev) if "mean" in q else prev
            return q["x_prev"](mean) if "x_prev" in q else mean
        mean = prev - std * z
        if "mean" in q:
            mean = q["mean"](mean)
        if "variance" in q:
            std = q["variance"](torch.tensor(std**2, device=x.device)).clamp_min(0).sqrt()
        prev = mean + std * z
        return q["x_prev"](prev) if "x_prev" in q else prev

    def _improved_diffusion_step(self, scheduler: ImprovedDDPMScheduler, model_output: torch.Tensor,
                                 t: torch.Tensor, x: torch.Tensor,
                                 generators: list[torch.Generator] | None) -> torch.Tensor:
        """improved-diffusion's mean and variance (a tensor: the learned range is per element), quantized."""
        q = self.quantizers
        p = scheduler.p_mean_variance(model_output, t, x)
        mean = q["mean"](p.mean) if "mean" in q else p.mean
        if not scheduler.adds_noise(t):  # the last step
            return q["x_prev"](mean) if "x_prev" in q else mean
        if generators is None:
            raise ValueError("sampler output quantization of a stochastic step needs per-image generators")
        if "variance" in q:
            std = q["variance"](p.log_variance.exp()).clamp_min(0).sqrt()
        else:
            std = torch.exp(0.5 * p.log_variance)
        prev = scheduler.sample_from(mean, std, t, generators)
        return q["x_prev"](prev) if "x_prev" in q else prev
