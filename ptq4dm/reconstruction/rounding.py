"""Learned quantization during reconstruction: AdaRound's rounding of weights, LSQ's activation step sizes,
QDrop's random dropping of activation quantization. Each one stands in for a Quantizer (``Quantizer.override``)
while a unit is optimised, and hands back a plain result afterwards (0/1 rounding decisions, a step size).

AdaRound (Nagel et al. 2020): W_q = s * (clamp(floor(W/s) + h(alpha) + z) - z) with the rectified sigmoid
h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, alpha initialised so that
h(alpha) is the fractional part of W/s (the nearest-level rounding's starting point), and the regulariser
sum(1 - |2h - 1|^b) pulling h to 0 or 1 as b anneals. The values are those of Q-Diffusion's
qdiff/adaptive_rounding.py:35-36 and 67-71 (see experiments/references/reference_code_facts.md, Q7).
"""

from __future__ import annotations

import torch
from torch import nn

from ptq4dm.quant.quantizer import Quantizer, fake_quantize_ste

GAMMA, ZETA = -0.1, 1.1


class AdaRoundWeight(nn.Module):
    """The learned rounding of one weight (or one split part of it), on its quantizer's grid. With
    ``learn_scale`` the grid's step (per output channel) is learned too, as a factor exp(g) on the searched step:
    the integer codes stay floor(W / s0) + rounding, so the step's gradient is the codes' own (the rounding's and
    the step's learning do not chase each other through the floor)."""

    def __init__(self, quantizer: Quantizer, weight: torch.Tensor, learn_scale: bool = False):
        super().__init__()
        object.__setattr__(self, "quantizer", quantizer)  # a reference, not a submodule (it points back here)
        shape = [1] * weight.dim()
        if quantizer.scale.dim():
            shape[quantizer.axis] = -1
        self.register_buffer("scale", quantizer.scale.detach().view(shape).clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().view(shape).clone())
        v = weight.detach().float() * self.scale.reciprocal()  # as the quantizer itself divides
        self.register_buffer("floor", torch.floor(v))
        rest = (v - self.floor).clamp(1e-6, 1 - 1e-6)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale)) if learn_scale else None
        # the weight as the quantizer will be given it (the codes' offsets are taken from it once the step moved)
        self.source = weight.detach() if learn_scale else None
        self.soft = True

    def step(self) -> torch.Tensor:
        return self.scale if self.log_gain is None else self.scale * self.log_gain.exp()

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def up(self) -> torch.Tensor:
        """The hard rounding: 1 where h >= 0.5 (alpha >= 0), else 0."""
        return (self.alpha.detach() >= 0).float()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        up = self.h() if self.soft else self.up()
        q = self.quantizer.spec
        return ((torch.clamp(self.floor + up + self.zero_point, q.qmin, q.qmax) - self.zero_point)
                * self.step()).to(w.dtype)

    def regulariser(self, b: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(b)).sum()

    def kept(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What the quantizer keeps (``set_scale`` when the step was learned, then ``set_rounding``): the new step
        (None if fixed) and the rounding. With the step fixed, AdaRound's 0/1 decisions. With it learned, per
        element the learned code (clamped, as the forward clamps it) minus floor(W / step) + zero point, computed
        as the quantizer's forward computes it so that it lands on the same codes bit for bit; 0 where the floor is
        already past the grid's end the code sits on (the clamp does the rest). Raises, before anything is kept, if
        an offset does not fit in int8."""
        if self.log_gain is None:
            return None, self.up().to(torch.int8)
        q = self.quantizer.spec
        step = self.step().detach().clamp_min(1e-12)  # the values set_scale will store
        target = torch.clamp(self.floor + self.up() + self.zero_point, q.qmin, q.qmax)
        base = torch.floor(self.source.float() * step.reciprocal()) + self.zero_point
        beyond = ((target == q.qmax) & (base >= q.qmax)) | ((target == q.qmin) & (base <= q.qmin))
        offsets = torch.where(beyond, torch.zeros_like(base), target - base)
        if offsets.min() < -128 or offsets.max() > 127:
            raise ValueError("a learned weight step moved the codes by more than int8 holds "
                             f"({int(offsets.min())} to {int(offsets.max())}); lower recon.method.weight_scale_lr")
        return step.flatten(), offsets.to(torch.int8)


class LearnedActivation(nn.Module):
    """An activation quantizer with a learnable step size (LSQ-style, straight-through rounding) and, for QDrop,
    each value quantized only with probability ``keep`` while training (else passed through in full precision)."""

    def __init__(self, quantizer: Quantizer, learn_scale: bool, keep: float = 1.0):
        super().__init__()
        object.__setattr__(self, "quantizer", quantizer)  # a reference, not a submodule (it points back here)
        self.keep = keep
        scale = quantizer.scale.detach().clone()
        self.scale = nn.Parameter(scale) if learn_scale else None
        self.register_buffer("fixed_scale", scale)

    def step(self) -> torch.Tensor:
        return self.fixed_scale if self.scale is None else self.scale.abs().clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if not q.enabled or not q.ready:
            return x
        xq = fake_quantize_ste(x, self.step(), q.zero_point, q.spec.qmin, q.spec.qmax)
        if self.training and self.keep < 1.0:
            return torch.where(torch.rand_like(x) < self.keep, xq, x)
        return xq
