"""Channel balance (SmoothQuant, Xiao et al. 2023, eq. 4): before the ranges are searched, move part of each
activation channel's spread into the weight that reads it.

A per-tensor activation grid is as coarse as its widest channel: in a UNet a few input channels of a conv span
two to six times the median channel's range, and every other channel is rounded on their grid. For each layer
whose input is quantized, the input channel j is divided by s_j and the weight's input slice j multiplied by it,

    s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha),

so that the full-precision product is unchanged. alpha = 0 leaves activations as they are (only rescaling by the
weights), 1 makes every activation channel the same width and puts all of the spread into the weights. The
factors come from the full-precision network on the calibration set (one observation pass) and are saved with
the quantized checkpoint. An integer kernel computes the same thing: the factor is part of the activation's
quantize step, and the weight is stored already multiplied.

max|x_j| is SmoothQuant's statistic, the largest value over the whole calibration set, so one outlying sample
sets a channel's factor. ``sample_quantile`` < 1 takes instead that quantile over the calibration samples of each
sample's own channel maximum (0.99: the 1% most extreme samples no longer set it); the range search after it
still sees every value.

``center`` (Outlier Suppression+, Wei et al. 2023, eq. 5-6: channel-wise shifting) also moves each channel's
midpoint z_j = (max x_j + min x_j) / 2 to zero before the grid, and takes the half-range (max - min) / 2 for
max|x_j|. A SiLU output spans [-0.28, M_j]: balanced without a shift, a narrow channel's -0.28 / s_j sets the
shared grid's lower end for every channel; centred, every channel uses both halves of the grid. Only x - z goes
through the input quantizer and z_j / s_j is added back before the product, so the function is unchanged (zero
padding included) and the quantized weight multiplies the input itself; an integer kernel adds the quantized
weight times the shift as a constant map, folded into the bias. A channel that is all but constant gets a
half-range near 0 and so the smallest factor: its balanced weight column may then round away on the weight grid,
as for any channel SmoothQuant shrinks that far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.quant.api import layers_reading_input
from ptq4dm.quant.modules import QuantLayer, channel_dim, input_axis


@dataclass
class ChannelBalance:
    """SmoothQuant's migration strength ``alpha`` in [0, 1]; factors are clamped to [1/max_factor, max_factor]
    so that an all-but-dead channel does not blow its weights up. ``sample_quantile`` in (0, 1]: which quantile
    over calibration samples of each sample's channel maximum stands for max|x_j| (1: the maximum, SmoothQuant).
    ``center``: shift each channel's midpoint to zero first (Outlier Suppression+); the statistic is then the
    half-range. With a ``sample_quantile`` the two ends are quantiles of each sample's maximum and minimum, which
    below 0.5 could cross, so centring takes a quantile of 0.5 or more."""

    alpha: float = 0.5
    max_factor: float = 1e4
    sample_quantile: float = 1.0
    center: bool = False

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha!r}: allowed is a number from 0 to 1")
        if not self.max_factor >= 1:
            raise ValueError(f"max_factor={self.max_factor!r}: allowed is 1 or more")
        if not 0 < self.sample_quantile <= 1:
            raise ValueError(f"sample_quantile={self.sample_quantile!r}: allowed is a number above 0, at most 1")
        if self.center and self.sample_quantile < 0.5:
            raise ValueError(f"sample_quantile={self.sample_quantile!r} with center=true: allowed is 0.5 to 1 "
                             "(lower, a channel's upper end could fall below its lower end)")

    def channel_extremes(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Per column, the statistic over calibration samples of each sample's maximum, from a (samples, columns)
        table: max|x_j| per channel, or (centred) max x_j and max -x_j side by side."""
        if self.sample_quantile == 1:
            return per_sample.amax(dim=0)
        return torch.quantile(per_sample, self.sample_quantile, dim=0)

    def factors(self, act_extent: torch.Tensor, weight_absmax: torch.Tensor) -> torch.Tensor:
        """One factor per input channel from the channels' activation extent (max|x_j|, or the half-range when
        centred) and weight extremes."""
        eps = 1e-8
        s = act_extent.clamp_min(eps).pow(self.alpha) / weight_absmax.clamp_min(eps).pow(1 - self.alpha)
        return s.clamp(1 / self.max_factor, self.max_factor)


@torch.no_grad()
def balance_(network: nn.Module, forward, calibration: CalibrationSet, balance: ChannelBalance,
             batch_size: int = 256, progress: bool = False) -> dict[str, torch.Tensor]:
    """Set the balance factors of every QuantLayer whose input is quantized, in place, from the full-precision
    network's activations on ``calibration`` (call before the range search, with the quantizers not yet set).
    Layers reading the network's own input x_t are left alone unless the config quantizes it. Returns the
    factors by layer name."""
    device = next(network.parameters()).device
    config = getattr(network, "quant_config", None)
    layers = {n: m for n, m in network.named_modules()
              if isinstance(m, QuantLayer) and m.input_quantizers and m.act_on == "input"
              and getattr(m.layer, "groups", 1) == 1}  # a grouped conv's weight does not see every input channel
    if config is not None and not config.network_input:
        x, t, cond = next(calibration.batches(1, device))
        for name in layers_reading_input(network, forward, x, t, cond):
            layers.pop(name, None)
    per_sample: dict[str, list[torch.Tensor]] = {}

    def observe(name):
        def hook(module, inputs):
            x = inputs[0].detach()
            dim = channel_dim(module.layer, x)
            # each sample's channel maxima (dim 0 is the batch in both conv and token layouts); centred: the
            # maxima of x and of -x side by side, (samples, 2 * channels). amax over no dims would reduce all.
            rest = [d for d in range(x.ndim) if d not in (0, dim)]
            sides = (x, -x) if balance.center else (x.abs(),)
            m = torch.cat([(v.amax(dim=rest) if rest else v).float() for v in sides], dim=-1)
            m = m if dim != 0 else m.unsqueeze(0)
            seen = per_sample.setdefault(name, [])
            if balance.sample_quantile == 1 and seen:  # the maximum needs no per-sample history: keep one row
                seen[0] = torch.maximum(seen[0], m.amax(dim=0, keepdim=True))
            else:
                seen.append(m)
        return hook

    for layer in layers.values():
        layer.set_balance(None)  # observe the layer's own input, not a previous balance's quotient
    handles = [layer.register_forward_pre_hook(observe(name)) for name, layer in layers.items()]
    try:
        batches = calibration.batches(batch_size, device)
        for x, t, cond in tqdm(batches, desc="channel balance", total=calibration.num_batches(batch_size),
                               disable=not progress, leave=False):
            forward(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    chosen = {}
    for name, layer in layers.items():
        if name not in per_sample:  # never called: nothing to balance
            continue
        extent, shift = balance.channel_extremes(torch.cat(per_sample.pop(name))), None
        if balance.center:
            hi, neg_lo = extent.chunk(2)
            shift, extent = (hi - neg_lo) / 2, (hi + neg_lo) / 2  # midpoint, half-range
        w = layer.layer.weight.detach().float()
        axis = input_axis(layer.layer)
        w_absmax = w.abs().amax(dim=[d for d in range(w.ndim) if d != axis])
        chosen[name] = balance.factors(extent, w_absmax)
        layer.set_balance(chosen[name], shift)
    return chosen


__all__ = ["ChannelBalance", "balance_"]
