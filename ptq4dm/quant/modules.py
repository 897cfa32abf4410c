"""Quantized stand-ins for Conv1d, Conv2d, ConvTranspose2d and Linear: quantizers on the weight and on the
input activation.

Weights are quantized per output channel: dim 0 of a Conv/Linear weight, dim 1 of a ConvTranspose weight
(``in, out/groups, kH, kW``). With ``split`` > 0 (shortcut splitting, Q-Diffusion), the input channels [0, split)
and [split, C) come from two different tensors concatenated at a UNet skip; each part gets its own activation
quantizer, and the matching slices of the weight their own per-channel scales.

With a channel balance (``set_balance``, SmoothQuant; ``calibration.balance``) the input is divided by one factor
per input channel before its quantizer and the weight multiplied by the same factor along its input channels
before its quantizer: the product is unchanged in full precision, and an integer kernel computes the same (the
factor is part of the activation's quantize step and is folded into the stored weight). A balance may also
shift each input channel (``shift``, Outlier Suppression+): the quantizer sees the balanced input minus
shift / factor, and shift / factor is added back after it, so the layer still computes on the input itself (an
integer kernel adds the quantized weight times the shift as a constant map, folded into the bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptq4dm.quant.quantizer import Quantizer, QuantSpec

LAYER_KINDS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def output_axis(layer: nn.Module) -> int:
    """The weight dimension of the output channels."""
    return 1 if isinstance(layer, nn.ConvTranspose2d) else 0


def input_axis(layer: nn.Module) -> int:
    """The weight dimension of the input channels."""
    return 0 if isinstance(layer, nn.ConvTranspose2d) else 1


def channel_dim(layer: nn.Module, x: torch.Tensor) -> int:
    """The dimension of ``x`` (this layer's input) that holds its input channels."""
    return x.ndim - 1 if isinstance(layer, nn.Linear) else 1


class QuantLayer(nn.Module):
    """``act_on="input"`` (the default) quantizes the layer's input; ``"output"`` its output instead, as the
    PTQ4DM reference code does (``output_quantizers``; no input quantizers then)."""

    def __init__(self, layer: nn.Module, weight: QuantSpec | None, activation: QuantSpec | None, split: int = 0,
                 act_on: str = "input"):
        super().__init__()
        if not isinstance(layer, LAYER_KINDS):
            raise TypeError(f"QuantLayer wraps {[k.__name__ for k in LAYER_KINDS]}, not {type(layer).__name__}")
        if act_on not in ("input", "output"):
            raise ValueError(f"act_on={act_on!r}: allowed are 'input' and 'output'")
        self.layer, self.weight_spec, self.activation_spec, self.act_on = layer, weight, activation, act_on
        self.register_buffer("_frozen_weight", None, persistent=False)  # moves with .to(); not saved
        self.register_buffer("balance", None, persistent=False)  # per input channel (set_balance); saved by checkpoint
        self.register_buffer("balance_shift", None, persistent=False)  # z_j in input units; saved like balance
        self.output_quantizers = nn.ModuleList(
            [Quantizer(activation, axis=1).to(layer.weight.device)] if activation and act_on == "output" else [])
        self.set_split(split)

    @property
    def out_axis(self) -> int:
        return output_axis(self.layer)

    def set_split(self, split: int) -> None:
        """Give input channels [0, split) and [split, C) separate quantizers (0: one quantizer for all)."""
        in_channels = self.layer.weight.shape[input_axis(self.layer)]
        if split and isinstance(self.layer, nn.ConvTranspose2d):
            raise ValueError("shortcut splitting applies to Conv/Linear layers reading a skip concatenation")
        if not 0 <= split < in_channels:
            raise ValueError(f"split={split} outside the layer's {in_channels} input channels")
        if split and self.act_on == "output":
            raise ValueError("shortcut splitting separates input quantizers; this layer quantizes its output")
        self.split, parts = split, 2 if split else 1
        out_channels = self.layer.weight.shape[self.out_axis]
        device = self.layer.weight.device  # split after the model moved to its device: follow it
        self.weight_quantizers = nn.ModuleList(
            [Quantizer(self.weight_spec, out_channels, axis=self.out_axis).to(device) for _ in range(parts)]
            if self.weight_spec else [])
        self.input_quantizers = nn.ModuleList(
            [Quantizer(self.activation_spec, axis=1).to(device) for _ in range(parts)]
            if self.activation_spec and self.act_on == "input" else [])
        self._frozen_weight = None

    def set_balance(self, factors: torch.Tensor | None, shift: torch.Tensor | None = None) -> None:
        """Divide the input by ``factors`` (one per input channel) and multiply the weight by them (None: off);
        ``shift`` (one per input channel, in the input's units) is taken off before the input quantizers and
        added back after them."""
        channels = self.layer.weight.shape[input_axis(self.layer)]
        for what, v in (("factors", factors), ("shift", shift)):
            if v is not None and v.shape != (channels,):
                raise ValueError(f"balance {what} of shape {tuple(v.shape)} for {channels} input channels")
        if shift is not None and factors is None:
            raise ValueError("a balance shift needs balance factors (1 for none)")

        def as_buffer(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v.detach().float().to(self.layer.weight.device)

        self.balance, self.balance_shift = as_buffer(factors), as_buffer(shift)
        self._frozen_weight = None

    def balanced_weight(self) -> torch.Tensor:
        """The weight the weight quantizers see: the layer's own, times the balance factors along its inputs."""
        w = self.layer.weight
        if self.balance is None:
            return w
        shape = [1] * w.ndim
        shape[input_axis(self.layer)] = -1
        return w * self.balance.view(shape).to(w.dtype)

    # The weight as the layer computes with it: quantized part by part along the input channels.
    def quantized_weight(self) -> torch.Tensor:
        if self._frozen_weight is not None and all(q.enabled for q in self.weight_quantizers):
            return self._frozen_weight
        return self._by_part(self.weight_quantizers, self.balanced_weight())

    def weight_part(self, part: int) -> torch.Tensor:
        """The slice of the (balanced) weight that weight quantizer ``part`` quantizes."""
        w = self.balanced_weight()
        if not self.split:
            return w
        return w[:, : self.split] if part == 0 else w[:, self.split:]

    def freeze_weight(self) -> None:
        """Quantize the weight once, after calibration, instead of at every call."""
        self._frozen_weight = None
        with torch.no_grad():
            self._frozen_weight = self.quantized_weight().detach()

    def unfreeze_weight(self) -> None:
        self._frozen_weight = None

    def _by_part(self, quantizers: nn.ModuleList, t: torch.Tensor) -> torch.Tensor:
        """Quantize ``t`` (a weight or an input; channels on dim 1) with one quantizer per input part."""
        if not quantizers:
            return t
        if not self.split:
            return quantizers[0](t)
        return torch.cat([quantizers[0](t[:, : self.split]), quantizers[1](t[:, self.split:])], dim=1)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        shift = None
        if self.balance is not None:
            shape = [1] * x.ndim
            shape[channel_dim(self.layer, x)] = -1
            x = x.float() / self.balance.view(shape)  # in fp32: a bf16 quotient would be off by up to a level
            if self.balance_shift is not None and self.input_quantizers:
                shift = (self.balance_shift / self.balance).view(shape)
        # Centred channels: only x - shift goes through the input quantizer, and the shift is added back before
        # the product, so the quantized weight multiplies the input itself. Its rounding error scales with what
        # it multiplies, and a skewed channel's midpoint (a SiLU output's) is far from where its values sit: with
        # the shift's product taken apart in full precision instead, the layers' output error was ten times this.
        x = self._by_part(self.input_quantizers, x) if shift is None else \
            self._by_part(self.input_quantizers, x - shift) + shift
        y = self._compute(x, output_size)
        return self.output_quantizers[0](y) if self.output_quantizers else y

    def _compute(self, x: torch.Tensor, output_size) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        layer = self.layer
        if isinstance(layer, nn.ConvTranspose2d):
            padding = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size, 2,
                                            layer.dilation)
            return F.conv_transpose2d(x, w, layer.bias, layer.stride, layer.padding, padding, layer.groups,
                                      layer.dilation)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            return layer._conv_forward(x, w, layer.bias)
        return F.linear(x, w, layer.bias)

    def extra_repr(self) -> str:
        return f"split={self.split}" if self.split else ""
