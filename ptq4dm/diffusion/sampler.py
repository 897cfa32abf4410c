"""Samplers: a diffusers scheduler built from the model's training schedule, driven by one loop.

Every random draw of an image (its starting noise and any per-step noise) comes from a generator seeded by
(seed, image index), so an image is the same whatever the batch size, batch order or device count.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerMixin,
)
from diffusers.utils.torch_utils import randn_tensor

from ptq4dm.diffusion.conditioning import Conditioning
from ptq4dm.diffusion.improved_ddpm import ImprovedDDPMScheduler

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
# What each sampler's step turns into x_{t-1} (diffusers converts): the network's output is the noise (epsilon),
# the velocity v = sqrt(a) eps - sqrt(1 - a) x_0 (v_prediction), or x_0 itself (sample). PNDM has no x_0 form.
PREDICTION_TYPES: dict[str, tuple[str, ...]] = {
    "ddim": ("epsilon", "v_prediction", "sample"),
    "ddpm": ("epsilon", "v_prediction", "sample"),
    "dpm_solver": ("epsilon", "v_prediction", "sample"),
    "pndm": ("epsilon", "v_prediction"),
}


def check_prediction_type(name: str, prediction_type: str, key: str = "sampler") -> None:
    """A clear error, before any sampling, when sampler ``name`` cannot step with ``prediction_type``."""
    allowed = PREDICTION_TYPES.get(name)
    if allowed is not None and prediction_type not in allowed:
        samplers = sorted(n for n, kinds in PREDICTION_TYPES.items() if prediction_type in kinds)
        raise ValueError(f"{key}.name={name!r} cannot sample a network with prediction_type={prediction_type!r}: "
                         f"{name} allows {list(allowed)}; samplers that allow {prediction_type!r}: {samplers}")


def seeded_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index) through NumPy's SeedSequence."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


class Sampler:
    """A reverse-diffusion sampler over ``steps`` network calls.

    ``name`` picks the diffusers scheduler (``ddim``, ``ddpm``, ``dpm_solver``, ``pndm``); ``eta`` is DDIM's
    stochasticity. The schedule (betas, T) and what the network predicts (``prediction_type``: epsilon,
    v_prediction or sample, see PREDICTION_TYPES) come from the model's own training scheduler config.
    """

    def __init__(self, train_scheduler: SchedulerMixin, name: str = "ddim", steps: int = 100, eta: float = 0.0,
                 **scheduler_kwargs):
        if name not in SAMPLERS:
            raise ValueError(f"sampler.name={name!r} is not one of {sorted(SAMPLERS)}")
        T = train_scheduler.config.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"sampler.steps={steps} must be in [1, {T}] (the model's training steps)")
        check_prediction_type(name, train_scheduler.config.get("prediction_type", "epsilon"))
        self.name, self.steps, self.eta = name, int(steps), float(eta)
        cls = SAMPLERS[name]
        if name == "ddpm" and isinstance(train_scheduler, ImprovedDDPMScheduler):
            cls = ImprovedDDPMScheduler  # converted improved-diffusion models keep its own DDPM step
        self.scheduler = cls.from_config(train_scheduler.config, **scheduler_kwargs)
        self.scheduler.set_timesteps(self.steps)
        step_params = inspect.signature(self.scheduler.step).parameters
        self._step_kwargs = {"eta": self.eta} if "eta" in step_params else {}
        self._takes_generator = "generator" in step_params
        # A network with a learned variance (improved-diffusion, learn_sigma) outputs [eps, v]: 2C channels.
        # DDPM with variance_type learned/learned_range consumes both; the other samplers take eps only.
        self._learned_variance = isinstance(self.scheduler, DDPMScheduler) and \
            self.scheduler.config.variance_type in ("learned", "learned_range")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def timesteps(self) -> torch.Tensor:
        """The time steps fed to the network, in call order (PNDM repeats some)."""
        return self.scheduler.timesteps

    def initial_noise(self, generators: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32):
        return randn_tensor((len(generators), *shape), generator=generators, device=torch.device(device), dtype=dtype)

    @torch.no_grad()
    def sample(self, model: Callable[..., torch.Tensor], noise: torch.Tensor,
               generators: list[torch.Generator] | None = None,
               on_step: Callable[..., None] | None = None,
               num_steps: int | None = None, output_quantizer=None,
               conditioning: Conditioning | None = None, clip: bool = True) -> torch.Tensor:
        """Run the reverse process from ``noise``; returns x_0, clipped to [-1, 1] unless ``clip`` is False (latents),
        or x after ``num_steps`` steps.

        ``model(x_t, t)`` returns the network's prediction (the noise, v or x_0, as the training scheduler's
        prediction_type says; the scheduler's step converts). ``on_step(i, t, x_t)`` sees each network input exactly
        as the network gets it. ``output_quantizer`` (a SamplerOutputQuantizer) quantizes the step's mean,
        variance and x_{t-1}. A fresh copy of the scheduler state is used, so a Sampler is reusable.

        With ``conditioning`` (one row per image) the network is called as ``model(x, t, cond)``, under
        classifier-free guidance once on ([x; x], [uncond; cond]) (see Conditioning), and the callback as
        ``on_step(i, t, x, cond)`` with both inputs exactly as the network gets them.
        """
        if conditioning is not None:
            if len(conditioning) != len(noise):
                raise ValueError(f"conditioning has {len(conditioning)} rows but noise has {len(noise)} images: "
                                 "allowed is one row per image")
            if on_step is not None:
                _check_takes_cond(on_step)
            conditioning = conditioning.to(noise.device)
        scheduler = self._fresh_scheduler()
        x = noise * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps[:num_steps]):
            model_input = scheduler.scale_model_input(x, t)
            if conditioning is None:
                if on_step is not None:
                    on_step(i, t, model_input)
                out = model(model_input, t.to(x.device))
            else:
                net_x, net_cond = conditioning.network_inputs(model_input)
                if on_step is not None:
                    on_step(i, t, net_x, net_cond)
                out = conditioning.guide(model(net_x, t.to(x.device), net_cond), channels=x.shape[1])
            prediction = self._model_output(out, x)
            if output_quantizer is not None:
                x = output_quantizer.step(scheduler, prediction, t, x, self._step_kwargs, generators)
            else:
                kwargs = dict(self._step_kwargs)
                if self._takes_generator and generators is not None:
                    kwargs["generator"] = generators
                x = scheduler.step(prediction, t, x, **kwargs).prev_sample
            if not torch.isfinite(x).all():  # one device sync a step: cheap next to a network call
                raise FloatingPointError(f"non-finite values after sampler step {i} (t={int(t)})")
        return x.clamp(-1, 1) if clip and num_steps is None else x

    def _model_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the scheduler's step takes: [eps, v] for a learned-variance DDPM, the prediction otherwise."""
        c = x.shape[1]
        if self._learned_variance:
            if out.shape[1] != 2 * c:
                raise ValueError(f"the model's scheduler has variance_type={self.scheduler.config.variance_type!r}, "
                                 f"which needs [eps, v] ({2 * c} channels), but the network returned {out.shape[1]}")
            return out
        return out[:, :c] if out.shape[1] == 2 * c else out  # drop a learned variance this sampler cannot use

    def _fresh_scheduler(self) -> SchedulerMixin:
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(self.steps)
        return scheduler


def _check_takes_cond(on_step: Callable) -> None:
    try:
        inspect.signature(on_step).bind(0, None, None, None)
    except TypeError:
        raise TypeError("on_step must take (i, t, x, cond) when conditioning is given: it is shown the network's "
                        "conditioning input too") from None
    except ValueError:  # no inspectable signature (a builtin): trust the caller
        pass


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 images the way diffusers pipelines round them."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
