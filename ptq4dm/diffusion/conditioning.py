"""What a conditional denoiser is fed besides (x_t, t), and classifier-free guidance.

The conditioning is computed outside ptq4dm (text encoder, label lookup): a UNet2DConditionModel takes
encoder_hidden_states (N, L, D), a class-conditional UNet2DModel (``num_class_embeds``) class labels (N,). Both
are passed to the network as its third positional argument, ``model(x, t, cond)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(eq=False)
class Conditioning:
    """Per-image conditioning and, for classifier-free guidance, the unconditional input.

    ``cond`` has one row per image. ``uncond`` is the unconditional input (the empty prompt's embedding, a
    null class label): one row shared by every image, given as (1, ...) or without the batch dimension, or
    one row per image (N, ...). With ``guidance_scale`` w != 1 the network is called once on [x; x] with
    [uncond; cond] and eps = eps_u + w (eps_c - eps_u), as diffusers pipelines do; with w = 1 it is called on
    x with cond and ``uncond`` is not used.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    guidance_scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.cond, torch.Tensor) or self.cond.ndim < 1 or len(self.cond) < 1:
            raise ValueError("Conditioning.cond must be a tensor with one row per image: encoder_hidden_states "
                             f"(N, L, D) or class labels (N,); got {_describe(self.cond)}")
        w = self.guidance_scale
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"Conditioning.guidance_scale={w!r}: allowed is a finite number (1: no guidance)")
        self.guidance_scale = float(w)
        if self.uncond is None:
            if self.guided:
                raise ValueError(f"Conditioning.uncond is needed for classifier-free guidance (guidance_scale={w}): "
                                 "give the unconditional embedding or label, or guidance_scale=1")
            return
        if isinstance(self.uncond, (int, float)) and not isinstance(self.uncond, bool):
            self.uncond = torch.tensor(self.uncond)  # a null class label given as a number
        if not isinstance(self.uncond, torch.Tensor):
            raise ValueError(f"Conditioning.uncond must be a tensor, got {_describe(self.uncond)}")
        row = tuple(self.cond.shape[1:])
        if tuple(self.uncond.shape) == row:
            self.uncond = self.uncond[None]
        if tuple(self.uncond.shape[1:]) != row or len(self.uncond) not in (1, len(self.cond)):
            raise ValueError(f"Conditioning.uncond has shape {tuple(self.uncond.shape)}; allowed are {row} or "
                             f"{(1, *row)} (shared by all images) or {(len(self.cond), *row)} (one per image), "
                             f"to match cond {tuple(self.cond.shape)}")
        if self.uncond.is_floating_point() != self.cond.is_floating_point():
            raise ValueError(f"Conditioning.uncond is {self.uncond.dtype} but cond is {self.cond.dtype}: both must be "
                             "embeddings (floating point) or both labels (integers)")
        self.uncond = self.uncond.to(self.cond.device, self.cond.dtype)

    def __len__(self) -> int:
        return len(self.cond)

    @property
    def guided(self) -> bool:
        """Whether sampling uses classifier-free guidance (two network inputs per image)."""
        return self.guidance_scale != 1.0

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Conditioning:
        """The conditioning of some images (rows of ``cond``, and of ``uncond`` where it has one per image)."""
        if isinstance(index, int):
            index = [index]  # keep the batch dimension
        uncond = self.uncond
        if uncond is not None and len(uncond) > 1:
            uncond = uncond[index]
        return Conditioning(self.cond[index], uncond, self.guidance_scale)

    subset = __getitem__

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; ``dtype`` casts embeddings only (labels stay integers)."""
        def move(c):
            return c.to(device, dtype if dtype is not None and c.is_floating_point() else None)

        return Conditioning(move(self.cond), None if self.uncond is None else move(self.uncond), self.guidance_scale)

    def network_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, cond) as the network gets them for images ``x`` (N, ...): under guidance ([x; x], [uncond; cond])."""
        if len(x) != len(self):
            raise ValueError(f"conditioning has {len(self)} rows for {len(x)} images: allowed is one row per image")
        if not self.guided:
            return x, self.cond
        uncond = self.uncond.expand(len(self), *self.uncond.shape[1:])
        return torch.cat([x, x]), torch.cat([uncond, self.cond])

    def guide(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        """One output per image from the network's output on ``network_inputs``.

        Guidance applies to eps, the first ``channels`` channels; further channels (a learned variance) are
        taken from the conditional half, as diffusers' DeepFloyd IF pipeline does.
        """
        if not self.guided:
            return out
        out_u, out_c = out.chunk(2)
        eps = out_u[:, :channels] + self.guidance_scale * (out_c[:, :channels] - out_u[:, :channels])
        return torch.cat([eps, out_c[:, channels:]], dim=1)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
