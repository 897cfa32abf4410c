"""Uniform affine fake quantization: integer grids, their ranges, and the one round-and-clamp.

A quantizer maps a real clipping range [lo, hi] to a scale and zero point on a ``bits``-bit grid and rounds
values onto it. Symmetric grids are signed and centred on 0 (zero point 0); asymmetric grids are unsigned and
place 0 exactly on a grid point. Per-channel quantizers keep one range per slice along ``axis``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantSpec:
    """What one quantizer does: bit-width, symmetry, and granularity (per tensor or per output channel)."""

    bits: int
    symmetric: bool = False
    per_channel: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"quantizer bits={self.bits!r}: allowed are whole numbers from 2 to 16")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  inv_scale: torch.Tensor | None = None):
    """Round ``x`` onto the integer grid and map it back: the only place rounding and clamping happen.

    ``x * (1 / scale)`` rather than ``x / scale``: a product rounds the same in every backend, whereas compiled
    GPU kernels may divide approximately and so round a few values to the neighbouring level.
    """
    inv_scale = scale.reciprocal() if inv_scale is None else inv_scale
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return (torch.clamp(torch.round(x * inv_scale) + zero_point, qmin, qmax) - zero_point) * scale
    # Without autograd the same arithmetic in place on one buffer: on a CPU each fresh temporary of a large
    # tensor costs page faults, and five of them made the range search's candidate scoring ten times slower.
    return (x * inv_scale).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def fake_quantize_rounded(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                          rounding: torch.Tensor) -> torch.Tensor:
    """Fake quantization with learned rounding (AdaRound): ``floor(x / scale) + rounding`` instead of the
    nearest level, ``rounding`` holding one small integer per element of ``x`` (a weight): AdaRound's 0/1
    decision, or, once reconstruction has also learned the step, the offset from floor(x / new step) to the
    learned code."""
    v = torch.floor(x.float() * scale.reciprocal()) + rounding.to(torch.float32)
    return ((torch.clamp(v + zero_point, qmin, qmax) - zero_point) * scale).to(x.dtype)


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                      qmax: int) -> torch.Tensor:
    """``fake_quantize`` with a straight-through gradient for the rounding, so that gradients reach ``x`` and
    ``scale`` (learned step sizes, LSQ; reconstruction)."""
    v = x.float() / scale
    v = v + (torch.round(v) - v).detach()
    return ((torch.clamp(v + zero_point, qmin, qmax) - zero_point) * scale).to(x.dtype)


def fake_quantize_in_fp32(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                          inv_scale: torch.Tensor | None = None):
    """``fake_quantize`` computed in float32 and returned in ``x``'s dtype: bf16's 8-bit mantissa cannot tell
    neighbouring 8-bit levels apart."""
    return fake_quantize(x.float(), scale, zero_point, qmin, qmax, inv_scale).to(x.dtype)


@functools.cache
def fused_fake_quantize_in_fp32():
    """The same arithmetic as one fused GPU kernel (Inductor/Triton), compiled on first use: eager mode makes
    six memory-bound passes over every activation, which dominates quantized sampling time on a GPU."""
    return torch.compile(fake_quantize_in_fp32, dynamic=True)


def grid_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover the clipping range [lo, hi] (broadcast over channels)."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))  # grid holds 0
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zero_point = torch.clamp(torch.round(-lo / scale.clamp_min(1e-12)), spec.qmin, spec.qmax)
    return scale.clamp_min(1e-12), zero_point


class Quantizer(nn.Module):
    """Fake-quantizes its input once it has a range; observes instead while ``observer`` is set.

    ``axis`` is the channel dimension for per-channel quantizers (0 for weights).
    """

    def __init__(self, spec: QuantSpec, channels: int = 1, axis: int = 0):
        super().__init__()
        self.spec, self.axis = spec, axis
        shape = (channels,) if spec.per_channel else ()
        self.register_buffer("lo", torch.zeros(shape))
        self.register_buffer("hi", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))  # persisted with the ranges
        # Learned rounding of a weight (AdaRound; 0/1 per element, or offsets to the learned codes when the step
        # was learned too; empty: round to nearest), saved with the ranges.
        self.register_buffer("rounding", torch.zeros(0, dtype=torch.int8))
        self.enabled = True
        self.override = None  # during reconstruction: what computes this quantizer's output instead (set_override)
        self.fused = True  # per-tensor ranges on CUDA: one compiled kernel (same numbers); False: eager ops
        self.ready = False  # a Python mirror of `calibrated`: no device sync or graph break in forward
        self.observer = None  # set during calibration; sees full-precision inputs

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        self.lo.copy_(lo.reshape(self.lo.shape))
        self.hi.copy_(hi.reshape(self.hi.shape))
        scale, zero_point = grid_params(self.lo, self.hi, self.spec)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrated.fill_(True)
        self.ready = True

    def reset(self) -> None:
        """Forget the range and rounding and switch back on: the quantizer passes its input through until
        ``set_range``."""
        self.calibrated.fill_(False)
        self.rounding = torch.zeros(0, dtype=torch.int8, device=self.lo.device)
        self.ready, self.enabled = False, True

    def set_override(self, override) -> None:
        """A callable that computes this quantizer's output instead (learned rounding or step size while
        reconstructing), or None. Kept as a plain reference, not a submodule: it points back to this quantizer."""
        object.__setattr__(self, "override", override)

    def set_rounding(self, rounding: torch.Tensor | None) -> None:
        """Learned rounding for the weight this quantizer quantizes, as ``fake_quantize_rounded`` reads it: 0/1
        decisions, or integer offsets (None: nearest level)."""
        self.rounding = torch.zeros(0, dtype=torch.int8, device=self.lo.device) if rounding is None \
            else rounding.to(torch.int8).to(self.lo.device)

    def set_scale(self, scale: torch.Tensor) -> None:
        """A learned step size (LSQ): the grid keeps its zero point; the range follows the new step."""
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(self.scale.shape).to(self.scale.device)
        self.scale.copy_(scale.clamp_min(1e-12))
        self.lo.copy_((self.spec.qmin - self.zero_point) * self.scale)  # the range the grid now covers
        self.hi.copy_((self.spec.qmax - self.zero_point) * self.scale)
        self.calibrated.fill_(True)
        self.ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rounding = state_dict.get(prefix + "rounding")
        if rounding is not None and rounding.shape != self.rounding.shape:  # decisions exist for some weights only
            self.rounding = torch.empty_like(rounding, device=self.lo.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.ready = bool(self.calibrated)

    def _broadcast(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if t.ndim == 0:
            return t
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.view(shape)

    def quantize_with(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with a candidate range (range search); does not change the quantizer."""
        scale, zero_point = grid_params(lo, hi, self.spec)
        return fake_quantize(x, scale, zero_point, self.spec.qmin, self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        if self.override is not None:
            return self.override(x)
        if not self.enabled or not self.ready:
            return x
        scale = self._broadcast(self.scale, x.ndim)
        zero_point = self._broadcast(self.zero_point, x.ndim)
        if self.rounding.numel():
            return fake_quantize_rounded(x, scale, zero_point, self.spec.qmin, self.spec.qmax, self.rounding)
        if self.fused and x.is_cuda and scale.ndim == 0:
            # Flattened, one compiled kernel serves every activation shape (no recompiles per rank or size); the
            # reciprocal is computed outside it, exactly as the eager path computes it.
            try:
                flat = fused_fake_quantize_in_fp32()(x.reshape(-1), scale, zero_point, self.spec.qmin, self.spec.qmax,
                                                     scale.reciprocal())
                return flat.view(x.shape)
            except Exception as err:  # noqa: BLE001 - no working compiler (e.g. Triton missing): same math, eager
                log.warning("fused fake-quant kernel unavailable (%s: %s); using eager ops", type(err).__name__, err)
                self.fused = False
        return fake_quantize_in_fp32(x, scale, zero_point, self.spec.qmin, self.spec.qmax)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.spec.per_channel else "per-tensor"
        return f"{self.spec.bits}-bit {'symmetric' if self.spec.symmetric else 'asymmetric'} {kind}"
