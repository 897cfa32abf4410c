"""The calibration engine: one path from a full-precision network to a calibrated quantized one, used by the
Python API (``ptq4dm.quantize``) and by every job (``ptq4dm.run``, ``ptq4dm.evaluate``'s checkpoints).

Stages, in order, each its own module with its own config:
  place        trace the order the network runs its modules (one forward on a calibration batch), then swap
               layers for quantized ones (``quant.quantize_``, QuantConfig); the first layer is the first
               executed one that reads x_t, the last the last executed
  balance      optional: per input channel factors moved from activations into weights (SmoothQuant;
               ``calibration.balance``, balance/)
  ranges       observe full-precision activations and search every quantizer's range (``calibration.search``,
               RangeSearch)
  reconstruct  optional: learn weight rounding and step sizes unit by unit (``reconstruction``, recon/)
  freeze       quantize weights once; saving is ``quant.save_quantized``
The result says what stays in full precision and why.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ptq4dm.calibration.balance import ChannelBalance, balance_
from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.calibration.search import RangeChoice, RangeSearch, calibrate_, describe_quantizer
from ptq4dm.quant.api import CONV_KINDS, attention_projections, quantize_, quantizers, trace
from ptq4dm.quant.config import QuantConfig
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.reconstruction.methods import Reconstruction, ReconstructionContext, UnitReport

Forward = Callable[[nn.Module], Callable]  # network -> denoise(x, t, cond)


@dataclass
class PTQMethod:
    """How a network is quantized and calibrated: placement, optional channel balance, range search, and
    optional reconstruction."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    search: RangeSearch = field(default_factory=RangeSearch)
    reconstruction: Reconstruction | None = None
    balance: ChannelBalance | None = None

    def __post_init__(self):
        if self.balance is not None and self.quant.act_placement != "input":
            raise ValueError("balance/ divides each layer's input by per-channel factors: it needs "
                             f"ops.act_placement='input', not {self.quant.act_placement!r} (choose balance=none)")


@dataclass
class FullPrecision:
    """A layer, or a quantizer, left in full precision, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class CalibrationResult:
    network: nn.Module
    ranges: list[RangeChoice]
    reconstruction: list[UnitReport]
    full_precision: list[FullPrecision]
    order: list[str]  # module names as the network first calls them
    timings: dict[str, float]


def calibrate_network(network: nn.Module, fp_network: nn.Module, calibration: CalibrationSet, method: PTQMethod,
                      forward: Forward, batch_size: int = 256, progress: bool = False,
                      autocast: Callable[[], object] = nullcontext) -> CalibrationResult:
    """Quantize ``network`` (a full-precision copy of ``fp_network``, which stays as it is) in place and
    calibrate it on ``calibration``. ``forward(net)`` is the function the network is run with (in the
    calibration precision); ``autocast()`` that precision for reconstruction's own block calls."""
    device = next(network.parameters()).device
    timings = {}
    t0 = time.perf_counter()
    x, t, cond = next(calibration.batches(1, device))
    traced = trace(fp_network, forward(fp_network), x, t, cond)
    order = traced.order
    quantize_(network, method.quant, traced)
    timings["placement_seconds"] = time.perf_counter() - t0
    if method.balance is not None:  # before the ranges: they are searched on the balanced tensors
        tb = time.perf_counter()
        balance_(network, forward(network), calibration, method.balance, batch_size, progress)
        timings["balance_seconds"] = time.perf_counter() - tb
    t1 = time.perf_counter()
    ranges = calibrate_(network, forward(network), calibration, method.search, batch_size, progress)
    t2 = time.perf_counter()
    timings["range_search_seconds"] = t2 - t1
    reports: list[UnitReport] = []
    if method.reconstruction is not None:
        context = ReconstructionContext(fp_network, network, forward(fp_network), forward(network), calibration,
                                        order, device, autocast, progress)
        reports = method.reconstruction.run(context)
        ranges = current_ranges(network, ranges)
        timings["reconstruction_seconds"] = time.perf_counter() - t2
    for layer in network.modules():
        if isinstance(layer, QuantLayer):
            layer.freeze_weight()
    return CalibrationResult(network, ranges, reports, full_precision(network, order), order, timings)


@torch.no_grad()
def calibrate_sampler_outputs(output_quantizer, sampler, denoise, search: RangeSearch, image_shape, device,
                              num_trajectories: int = 64, seed: int = 1235, conditioner=None) -> list[RangeChoice]:
    """Ranges of the sampler's own outputs (PTQ4DM Table 1: mean, variance, x_{t-1}) from full-precision
    trajectories: each quantizer observes while the sampler runs, then its range is searched."""
    from ptq4dm.calibration.observer import ValueSample
    from ptq4dm.calibration.search import search_range
    from ptq4dm.diffusion import seeded_generators

    named = output_quantizer.quantizers
    for i, q in enumerate(named.values()):
        q.observer = ValueSample(search.max_values, seed=i)
    generators = seeded_generators(seed, range(num_trajectories))
    noise = sampler.initial_noise(generators, image_shape, device)
    conditioning = None if conditioner is None else conditioner(torch.arange(num_trajectories))
    try:
        sampler.sample(denoise, noise, generators, output_quantizer=output_quantizer, conditioning=conditioning)
    finally:
        observers = {name: q.observer for name, q in named.items()}
        for q in named.values():
            q.observer = None
    choices = []
    for name, q in named.items():
        obs = observers[name]
        lo, hi, score, base = search_range(obs.values(), obs.min.reshape(1), obs.max.reshape(1), q,
                                           search.metric.for_spec(q.spec), search.num_candidates,
                                           search.independent_ends)
        q.set_range(lo, hi)
        choices.append(RangeChoice(f"sampler.{name}", "sampler output", q.spec.bits, float(lo), float(hi),
                                   float(obs.min), float(obs.max), None if score is None else float(score),
                                   None if base is None else float(base)))
    return choices


def current_ranges(network: nn.Module, ranges: list[RangeChoice]) -> list[RangeChoice]:
    """The range table after reconstruction: learned step sizes change activation ranges (the observed ranges
    and scores stay those of the search)."""
    now = {describe_quantizer(name): q for name, q in quantizers(network).items()}
    out = []
    for r in ranges:
        q = now.get((r.quantizer, r.tensor))
        if q is not None and q.ready:
            r = RangeChoice(**{**r.__dict__, "lo": float(q.lo.min()), "hi": float(q.hi.max())})
        out.append(r)
    return out


def full_precision(network: nn.Module, order: list[str]) -> list[FullPrecision]:
    """Every weight layer, and every placed quantizer, that computes in full precision, with the reason."""
    config: QuantConfig | None = getattr(network, "quant_config", None)
    executed = set(order)
    projections = attention_projections(network) if config is not None and not config.attention_projections \
        else set()
    rows = []
    for name, m in network.named_modules():
        if isinstance(m, QuantLayer) or any(isinstance(p, QuantLayer) for p in _parents(network, name)):
            continue
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        kind = type(m).__name__
        if isinstance(m, (*CONV_KINDS, nn.Linear)):
            if config is not None and any(_matches(name, p) for p in config.exclude):
                reason = "excluded by ops.exclude"
            elif name in projections:
                reason = "attention projection (ops.attention_projections=false)"
            elif config is not None and not (config.conv if isinstance(m, CONV_KINDS) else config.linear):
                reason = f"ops.{'conv' if isinstance(m, CONV_KINDS) else 'linear'}=false"
            else:
                reason = "not quantized"
        elif "Norm" in kind:
            reason = "normalisation layer (kept in full precision by design)"
        elif isinstance(m, nn.Embedding):
            reason = "embedding lookup (no matmul to quantize)"
        else:
            reason = "layer kind not quantized"
        if name not in executed:
            reason += "; never called by the forward pass"
        rows.append(FullPrecision(name, kind, reason))
    for name, q in quantizers(network).items():
        if q.enabled and q.ready:
            continue
        layer, tensor = describe_quantizer(name)
        rows.append(FullPrecision(f"{layer} ({tensor})", "quantizer", getattr(q, "fp_reason", None) or "not calibrated"))
    return rows


def _parents(network: nn.Module, name: str):
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield network.get_submodule(".".join(parts[:i]))


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


__all__ = ["CalibrationResult", "FullPrecision", "PTQMethod", "calibrate_network", "calibrate_sampler_outputs",
           "full_precision"]


def as_rows(items) -> list[dict]:
    return [dict(i.__dict__) for i in items]


def in_precision(dtype: torch.dtype | None, device: torch.device):
    """An autocast context for ``dtype`` on ``device`` (None or a CPU device: full precision)."""
    def context():
        enabled = dtype is not None and device.type == "cuda"
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=enabled)
    return context
