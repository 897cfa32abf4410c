"""How calibration time steps are drawn. Each distribution returns indices into the sampler's step list.

Drawing over the sampler's own steps (not over 0..T-1) is what keeps a calibration input and its t exactly
what the network sees at inference, respaced schedules included. Fractions are of T (training steps).
"""

from __future__ import annotations

import torch


def _nearest_steps(t: torch.Tensor, sampler_timesteps: torch.Tensor) -> torch.Tensor:
    """Index of the sampler step nearest to each t (ties go to the smaller t)."""
    steps = sampler_timesteps.float()
    dist = (t.float()[:, None] - steps[None, :]).abs() + 1e-3 * steps[None, :] / steps.max().clamp_min(1)
    return dist.argmin(dim=1)


class TimestepDistribution:
    """Base class: ``draw(n, sampler_timesteps, T, generator)`` returns n indices into ``sampler_timesteps``."""

    def draw(self, n: int, sampler_timesteps: torch.Tensor, T: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class Gaussian(TimestepDistribution):
    """NDTC (PTQ4DM Algorithm 1): t ~ N(mean*T, std*T), rounded down, clamped to [0, T-1], snapped to a step."""

    unit = "T"  # what mean and std are fractions of

    def __init__(self, mean: float = 0.4, std: float = 0.4):
        if not 0 <= mean <= 1:
            raise ValueError(f"calib.timesteps.mean={mean}: allowed is a fraction of {self.unit} in [0, 1]")
        if not std > 0:
            raise ValueError(f"calib.timesteps.std={std}: allowed is a fraction of {self.unit} above 0")
        self.mean, self.std = mean, std

    def draw(self, n, sampler_timesteps, T, generator):
        t = torch.randn(n, generator=generator) * self.std * T + self.mean * T
        t = t.floor().clamp(0, T - 1)
        return _nearest_steps(t, sampler_timesteps)


class Uniform(TimestepDistribution):
    """Every sampler step equally often (stratified, as Q-Diffusion's uniform calibration)."""

    def draw(self, n, sampler_timesteps, T, generator):
        k = len(sampler_timesteps)
        return torch.arange(n) * k // n if n >= k else torch.linspace(0, k - 1, n).round().long()


class RandomSteps(TimestepDistribution):
    """t ~ U(0, T), snapped to the nearest sampler step (PTQ4DM's Observation 3)."""

    def draw(self, n, sampler_timesteps, T, generator):
        return _nearest_steps(torch.randint(0, T, (n,), generator=generator), sampler_timesteps)


class Single(TimestepDistribution):
    """One time step for all samples: ``t`` as a fraction of T, snapped to the nearest sampler step."""

    unit = "T"

    def __init__(self, t: float = 0.5):
        if not 0 <= t <= 1:
            raise ValueError(f"calib.timesteps.t={t}: allowed is a fraction of {self.unit} in [0, 1]")
        self.t = t

    def draw(self, n, sampler_timesteps, T, generator):
        target = torch.full((n,), min(int(self.t * T), T - 1))
        return _nearest_steps(target, sampler_timesteps)


class ReferenceGaussian(Gaussian):
    """The PTQ4DM reference code's draw: k = N(mean, std) * S truncated toward zero and clamped to [0, S - 1],
    S the number of sampler steps, k counted from the noisiest step (it is its sampling loop's counter). So a
    mean of 0.4 lands 40% of the way from noise, at about t = 0.6 T, where ``Gaussian`` lands at 0.4 T.
    42Shawn/PTQ4DM at 613886e, PTQ4DM/improved-diffusion/scripts/quant_image_sample.py:53-56 and :70 (clamped)."""

    unit = "the sampler's steps"

    def draw(self, n, sampler_timesteps, T, generator):
        steps = len(sampler_timesteps)
        k = (torch.randn(n, generator=generator) * self.std + self.mean) * steps
        return k.to(torch.int64).clamp(0, steps - 1)  # .to(int64) truncates toward zero, as .type(torch.int)


class ReferenceSingle(Single):
    """The reference code's single step (its ``manual`` mode, Figure 4): k = t * S for every sample, clamped to
    [0, S - 1], counted from the noisiest step (quant_image_sample.py:49-52 and :70)."""

    unit = "the sampler's steps"

    def draw(self, n, sampler_timesteps, T, generator):
        steps = len(sampler_timesteps)
        return torch.full((n,), int(self.t * steps)).clamp(0, steps - 1)
