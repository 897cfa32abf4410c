"""Calibration sets: network inputs (x, t) chosen by a time-step distribution and produced by a source.

Sources:
  Trajectory     the full-precision model's own sampling trajectory (PTQ4DM): start from x_T ~ N(0, I), run
                 the sampler down to the drawn step, keep exactly what the network is fed there
  ForwardNoised  real images noised to the drawn step by the forward process q(x_t | x_0)
  RawImages      real images, fed with the drawn time step
  PureNoise      Gaussian noise, fed with the drawn time step

Every t is one of the sampler's own time steps and every x is passed through ``scale_model_input``, so a
calibration input is what the network sees at inference, respaced schedules included.

A conditional network is calibrated with a Conditioning of one row per sample: Trajectory samples with it,
and each sample's cond is what the network is fed with its x (under classifier-free guidance, two rows). The
image sources pair row i with the i-th drawn image as is: they do not know the images' own labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ptq4dm.calibration.timesteps import TimestepDistribution
from ptq4dm.diffusion.conditioning import Conditioning
from ptq4dm.diffusion.sampler import Sampler, seeded_generators


@dataclass
class CalibrationSet:
    x: torch.Tensor  # (N, C, H, W) network inputs
    t: torch.Tensor  # (N,) time steps fed with them
    step_index: torch.Tensor  # (N,) index of t in the sampler's step list (-1 where not from a sampler)
    cond: torch.Tensor | None = None  # (N, ...) conditioning fed with them, if any (build_calibration_set)

    @classmethod
    def of_inputs(cls, x: torch.Tensor) -> "CalibrationSet":
        """Inputs of a network that takes no time step (a VAE decoder, a text encoder): t = 0, no sampler step."""
        zeros = torch.zeros(len(x), dtype=torch.long)
        return cls(x=x, t=zeros, step_index=zeros - 1)

    def __len__(self) -> int:
        return len(self.x)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for s in range(0, len(self), batch_size):
            cond = None if self.cond is None else self.cond[s: s + batch_size].to(device)
            yield self.x[s: s + batch_size].to(device), self.t[s: s + batch_size].to(device), cond


Denoiser = Callable[..., torch.Tensor]  # denoise(x, t) or, with conditioning, denoise(x, t, cond)


class CalibrationSource:
    needs_images = False

    def build(self, denoise: Denoiser, sampler: Sampler, steps: torch.Tensor, seed: int, batch_size: int,
              device, image_shape, images: torch.Tensor | None = None, progress: bool = True,
              conditioning: Conditioning | None = None) -> torch.Tensor:
        """Network inputs (N, C, H, W) for the sampler steps ``steps`` (N,).

        ``conditioning`` (N rows, sample i conditioned on row i) is passed only when given; sources whose x
        does not depend on it ignore it.
        """
        raise NotImplementedError

    def labels(self, sampler: Sampler, steps: torch.Tensor) -> torch.Tensor:
        """The time step each input is fed with: the sampler's own time step at that step (what inference feeds)."""
        return sampler.timesteps[steps].clone()


class Trajectory(CalibrationSource):
    """Inputs from the full-precision model's own denoising trajectories, one trajectory per sample."""

    shift = 0  # keep the input of step k + shift: 0 the step's own input, 1 its output (ReferenceTrajectory)

    def build(self, denoise, sampler, steps, seed, batch_size, device, image_shape, images=None, progress=True,
              conditioning=None):
        last = len(sampler.timesteps) - 1
        out = torch.empty(len(steps), *image_shape)
        order = torch.argsort(steps, stable=True)  # batches of similar depth stop early together
        for s in tqdm(range(0, len(steps), batch_size), desc="calibration trajectories", disable=not progress,
                      leave=False):
            idx = order[s: s + batch_size]
            want = steps[idx].to(device) + self.shift
            generators = seeded_generators(seed, idx.tolist())
            noise = sampler.initial_noise(generators, image_shape, device)
            kept = torch.empty(len(idx), *image_shape, device=device)

            def keep(i, t, x, cond=None):
                x = x[-len(idx):]  # under guidance the network gets [x; x]: both halves are the same state
                hit = want == i
                if hit.any():
                    kept[hit] = x[hit]

            final = sampler.sample(denoise, noise, generators, on_step=keep,
                                   num_steps=min(int(want.max()) + 1, last + 1),
                                   conditioning=None if conditioning is None else conditioning[idx])
            done = want > last  # the output of the last step: the finished sample (unclipped)
            if done.any():
                kept[done] = final[-len(idx):][done].to(kept.dtype)
            out[idx] = kept.float().cpu()
        return out


class ReferenceTrajectory(Trajectory):
    """The PTQ4DM reference code's NDTC inputs, as its code pairs them (``calib=ndtc_reference``; the paper's
    text is ``Trajectory``): for a drawn step index k (counted from the noisiest step), the *output* of the
    sampler's step k, i.e. the state after k + 1 denoising steps from noise (the finished sample for the last
    step), fed with the label k itself, the respaced index, not the time step inference feeds there.

    42Shawn/PTQ4DM at 613886e, PTQ4DM/improved-diffusion/scripts/quant_image_sample.py:143-161 (``mask = t ==
    now_rt`` keeps ``sample_t["sample"]``, the step's output; ``_scale_timesteps`` leaves a respaced index as it
    is); experiments/references/reference_code_facts.md, P6. The label is the network's time input as given:
    exact for networks that take t as it is (small_cifar10, ddpm_cifar10); the converted improved-diffusion
    networks rescale t by 1000/T inside, where the reference's network saw k itself.
    """

    shift = 1

    def build(self, denoise, sampler, steps, *args, **kwargs):
        if sampler.name not in ("ddim", "ddpm"):  # others (PNDM) do not feed step i - 1's output to step i
            raise ValueError(f"calib=ndtc_reference pairs a step's output with the next step's input: it needs "
                             f"sampler ddim or ddpm (or calib.sampler set to one), not {sampler.name!r}")
        return super().build(denoise, sampler, steps, *args, **kwargs)

    def labels(self, sampler, steps):
        return steps.clone()


class ForwardNoised(CalibrationSource):
    """Real images noised by q(x_t | x_0) to the drawn step."""

    needs_images = True

    def build(self, denoise, sampler, steps, seed, batch_size, device, image_shape, images=None, progress=True,
              conditioning=None):
        g = torch.Generator().manual_seed(seed)
        x0 = _pick_images(images, len(steps), g)
        t = sampler.timesteps[steps]
        x_t = sampler.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        return _scale_inputs(sampler, x_t, t)


class RawImages(CalibrationSource):
    """Real images in [-1, 1], fed with the drawn step (PTQ4DM Table 2's "raw images")."""

    needs_images = True

    def build(self, denoise, sampler, steps, seed, batch_size, device, image_shape, images=None, progress=True,
              conditioning=None):
        x0 = _pick_images(images, len(steps), torch.Generator().manual_seed(seed))
        return _scale_inputs(sampler, x0, sampler.timesteps[steps])


class PureNoise(CalibrationSource):
    """Gaussian noise x ~ N(0, I), fed with the drawn step."""

    def build(self, denoise, sampler, steps, seed, batch_size, device, image_shape, images=None, progress=True,
              conditioning=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(steps), *image_shape, generator=g) * sampler.scheduler.init_noise_sigma
        return _scale_inputs(sampler, x, sampler.timesteps[steps])


def _pick_images(images: torch.Tensor | None, n: int, g: torch.Generator) -> torch.Tensor:
    if images is None or len(images) == 0:
        raise ValueError("this calibration source needs real images (data.root)")
    idx = torch.randint(0, len(images), (n,), generator=g)
    return images[idx].float() / 127.5 - 1


def _scale_inputs(sampler: Sampler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    scheduler = sampler._fresh_scheduler()
    return torch.stack([scheduler.scale_model_input(xi[None], ti)[0] for xi, ti in zip(x, t)])


def build_calibration_set(denoise: Denoiser, sampler: Sampler, timesteps: TimestepDistribution,
                          source: CalibrationSource, num_samples: int, image_shape: tuple[int, int, int],
                          seed: int = 1234, batch_size: int = 256, device="cpu",
                          images: torch.Tensor | None = None, progress: bool = True,
                          conditioning: Conditioning | None = None) -> CalibrationSet:
    """Draw ``num_samples`` time steps and build the inputs the network sees at them.

    With ``conditioning`` (one row per sample: sample i is conditioned on row i) the set's ``cond`` is what
    the network is fed with each x. Under classifier-free guidance the network gets every x twice, so sample
    i gives two rows with the same x and t: 2i with the unconditional input, 2i + 1 with the conditional one.
    """
    if num_samples < 1:
        raise ValueError(f"calib.num_samples={num_samples}: allowed is 1 or more")
    if conditioning is not None and len(conditioning) != num_samples:
        raise ValueError(f"conditioning has {len(conditioning)} rows but calib.num_samples={num_samples}: allowed is "
                         "one row per calibration sample (pick rows with conditioning[indices])")
    steps = timesteps.draw(num_samples, sampler.timesteps, sampler.num_train_timesteps,
                           torch.Generator().manual_seed(seed))
    # Sources written before conditioning existed keep working for unconditional models.
    extra = {} if conditioning is None else {"conditioning": conditioning}
    x = source.build(denoise, sampler, steps, seed, batch_size, device, image_shape, images, progress, **extra)
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite calibration inputs")
    t = source.labels(sampler, steps)
    if conditioning is None:
        return CalibrationSet(x=x, t=t, step_index=steps)
    # The very function the sampler feeds the network with, then sample by sample: [u_0, c_0, u_1, c_1, ...]
    x, cond = conditioning.network_inputs(x)
    copies = len(x) // num_samples
    rows = torch.arange(len(x)).view(copies, num_samples).T.flatten()
    return CalibrationSet(x=x[rows], t=t.repeat_interleave(copies), step_index=steps.repeat_interleave(copies),
                          cond=cond.cpu()[rows])


@dataclass
class CalibrationRecipe:
    """How a calibration set is made: which time steps, from which source, how many, from which seed."""

    timesteps: TimestepDistribution
    source: CalibrationSource
    num_samples: int = 1024
    batch_size: int = 256
    seed: int = 1234

    def __post_init__(self):
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"calib.num_samples={self.num_samples!r}: allowed is a whole number of 1 or more")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"calib.batch_size={self.batch_size!r}: allowed is a whole number of 1 or more")

    def build(self, denoise: Denoiser, sampler: Sampler, image_shape: tuple[int, int, int], device="cpu",
              images: torch.Tensor | None = None, progress: bool = True,
              conditioning: Conditioning | None = None) -> CalibrationSet:
        """The calibration set; ``conditioning`` has one row per sample (see build_calibration_set)."""
        return build_calibration_set(denoise, sampler, self.timesteps, self.source, self.num_samples, image_shape,
                                     self.seed, self.batch_size, device, images, progress, conditioning)
