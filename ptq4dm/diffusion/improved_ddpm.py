"""The DDPM step as openai/improved-diffusion computes it, for the converted improved-diffusion models.

``GaussianDiffusion`` (improved_diffusion/gaussian_diffusion.py) computes its constants in float64 and casts them
to float32 only when they multiply tensors; diffusers' DDPMScheduler computes them in float32, which near t = 0
cancels (1 - alphas_cumprod[1] is about 5e-5): one step at t = 1 differs by 5e-4 in the mean and 3e-3 in the
log-variance. At the first step improved-diffusion clips the posterior log-variance to that of the next step
(``posterior_log_variance_clipped[0] = log(posterior_variance[1])``) where diffusers clamps the variance to 1e-20.
Neither changes much in a sample (the last step adds no noise), but the variance the step computes is what
sampler-output quantization (``ops.sampler_outputs``) and variance-aware methods see.

Respacing: improved-diffusion's ``SpacedDiffusion`` keeps a set of steps and recomputes each beta from
alphas_cumprod at consecutive kept steps. A step here from t to the previous scheduled step p takes
beta = 1 - alphas_cumprod[t] / alphas_cumprod[p] (alphas_cumprod[-1] = 1), which is that same respaced process;
which steps are kept is set by ``timestep_spacing`` (README, "improved-diffusion models").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")


@dataclass(frozen=True)
class PosteriorStep:
    """p(x_{t-1} | x_t) of one step: a Gaussian with this mean and log-variance (per element), and the x_0 used."""

    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_original_sample: torch.Tensor


def float64_betas(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float,
                  trained_betas=None) -> np.ndarray:
    """The training betas in float64 (improved-diffusion's cosine and linear schedules)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    if beta_schedule == "squaredcos_cap_v2":  # improved-diffusion's "cosine": alpha_bar(s) = cos^2, beta <= 0.999
        s = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    raise ValueError(f"model.scheduler.beta_schedule={beta_schedule!r}: the improved-diffusion step knows "
                     "squaredcos_cap_v2 (its cosine) and linear")


class ImprovedDDPMScheduler(DDPMScheduler):
    """DDPMScheduler whose step is improved-diffusion's ``p_sample`` (epsilon prediction, clip_denoised =
    ``clip_sample``); same config, same time steps, same noise draws. ``p_mean_variance`` gives the step's mean and
    log-variance without sampling."""

    # No __init__ of its own: diffusers' from_config reads the arguments from DDPMScheduler's signature.

    @functools.cached_property
    def alphas_cumprod_f64(self) -> np.ndarray:
        """alphas_cumprod in float64, as improved-diffusion keeps them; the config checked on first use."""
        cfg = self.config
        if cfg.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"model.scheduler.variance_type={cfg.variance_type!r}: the improved-diffusion step "
                             f"knows {list(VARIANCE_TYPES)}")
        if cfg.prediction_type != "epsilon" or cfg.thresholding or cfg.rescale_betas_zero_snr:
            raise ValueError("the improved-diffusion step takes an epsilon-prediction network without thresholding "
                             f"or zero-SNR rescaling (model.scheduler: prediction_type={cfg.prediction_type!r}, "
                             f"thresholding={cfg.thresholding}, rescale_betas_zero_snr={cfg.rescale_betas_zero_snr})")
        betas = float64_betas(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
                              cfg.trained_betas)
        return np.cumprod(1 - betas)

    def _next_timestep(self, t: int) -> int | None:
        """The scheduled step after t in diffusion order (the one sampled just before t), None after the last."""
        if self.custom_timesteps or self.num_inference_steps:
            later = self.timesteps[self.timesteps > t]
            return int(later.min()) if len(later) else None
        return t + 1 if t + 1 < self.config.num_train_timesteps else None

    def _abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod_f64[t])

    def _log_posterior_variance(self, t: int, prev: int) -> float:
        a_t, a_prev = self._abar(t), self._abar(prev)
        return math.log((1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t))

    def p_mean_variance(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> PosteriorStep:
        """improved-diffusion's ``p_mean_variance`` for a network output [eps(, v)]: float64 constants of the
        (respaced) step, cast to the sample's dtype, and the tensor arithmetic in that dtype, as it does."""
        t = int(timestep)
        prev = int(self.previous_timestep(t))
        c = sample.shape[1]
        if model_output.shape[1] == 2 * c:
            eps, v = model_output.split(c, dim=1)
        elif self.config.variance_type == "learned_range":
            raise ValueError(f"variance_type='learned_range' needs [eps, v] ({2 * c} channels), "
                             f"got {model_output.shape[1]}")
        else:
            eps, v = model_output, None
        a_t, a_prev = self._abar(t), self._abar(prev)
        beta = 1 - a_t / a_prev  # the respaced beta
        log_beta = math.log(beta)
        if prev >= 0:
            log_post = self._log_posterior_variance(t, prev)
        else:  # the first step's posterior variance is 0: improved-diffusion takes the next step's instead
            nxt = self._next_timestep(t)
            # A one-step schedule has no next step (improved-diffusion fails there); log beta is a stand-in for a
            # step that adds no noise anyway.
            log_post = self._log_posterior_variance(nxt, t) if nxt is not None else log_beta

        x0 = math.sqrt(1 / a_t) * sample - math.sqrt(1 / a_t - 1) * eps
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean = (beta * math.sqrt(a_prev) / (1 - a_t)) * x0 + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)) * sample
        if self.config.variance_type == "learned_range":
            frac = (v + 1) / 2  # v in [-1, 1] spans [posterior variance, beta] in log space
            log_var = frac * log_beta + (1 - frac) * log_post
        else:  # fixed_large takes the clipped posterior variance at the first step too
            fixed = log_post if self.config.variance_type == "fixed_small" or prev < 0 else log_beta
            log_var = torch.full_like(sample, fixed)
        return PosteriorStep(mean, log_var, x0)

    def adds_noise(self, timestep) -> bool:
        """Every step but the last (improved-diffusion's respaced index 0) adds noise; with the leading and linspace
        spacings the last step is t = 0, where diffusers stops adding noise too."""
        return int(self.previous_timestep(int(timestep))) >= 0

    def sample_from(self, mean: torch.Tensor, std: torch.Tensor | float, timestep,
                    generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * z, z drawn as DDPMScheduler.step draws it; no draw and no noise at the last step."""
        if not self.adds_noise(timestep):
            return mean
        z = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * z

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> DDPMSchedulerOutput | tuple:
        p = self.p_mean_variance(model_output, timestep, sample)
        prev_sample = self.sample_from(p.mean, torch.exp(0.5 * p.log_variance), timestep, generator)
        if not return_dict:
            return prev_sample, p.pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=p.pred_original_sample)
