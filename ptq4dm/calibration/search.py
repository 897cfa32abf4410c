"""Range search: observe the full-precision network on the calibration set, then give every quantizer the
candidate clipping range its metric scores best. Candidates shrink the observed [min, max] by factors
1, 1 - 1/K, ..., 1/K (K = ``num_candidates``), per tensor for activations and per output channel for weights.

Shrinking both ends by one factor cannot clip a long positive tail without clipping the other side as much:
after SiLU, activations have a dense negative lobe down to -0.28 and a sparse tail that one unusual sample can
stretch to twice its usual extent. So for asymmetric grids each end is then searched on its own
(``independent_ends``), as the 2-D range and zero-point search of QDrop (which the PTQ4DM code builds on) does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq4dm.calibration.calibset import CalibrationSet
from ptq4dm.calibration.observer import ValueSample
from ptq4dm.calibration.range_metrics import ByBitWidth, LpDistance, RangeMetric
from ptq4dm.quant.api import layers_reading_input, split_shortcuts_
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.quant.quantizer import Quantizer

_CHUNK_ELEMENTS = 2**24  # candidates are scored in chunks of about this many values


@dataclass
class RangeSearch:
    """Which metric picks activation ranges and which picks weight ranges, over how many candidates."""

    metric: RangeMetric = field(default_factory=LpDistance)
    num_candidates: int = 100
    weight_metric: RangeMetric = field(default_factory=ByBitWidth)
    max_values: int = 65536  # values per activation quantizer kept for scoring
    independent_ends: bool = True  # asymmetric grids: refine lo and hi separately after the joint shrink
    # None: observe every batch in full precision, then search once. A momentum m: the PTQ4DM reference code's
    # way (QDrop/quant/quant_layer.py:107-120, set_act_quantize_params.py:8-47): weights quantized first, then
    # batch by batch, with every quantizer on, each activation quantizer searches the batch it sees and keeps
    # running = m * found + (1 - m) * running (0.1 there), quantizing with the running range in the same pass.
    act_ema: float | None = None

    def __post_init__(self):
        if self.act_ema is not None and not 0 < self.act_ema <= 1:
            raise ValueError(f"act_ema={self.act_ema}: allowed is null or a momentum in (0, 1]")
        if self.num_candidates < 1:
            raise ValueError(f"metric.num_candidates={self.num_candidates}: allowed is 1 or more")
        if self.max_values < 16:
            raise ValueError(f"metric.max_values={self.max_values}: allowed is 16 or more")


@dataclass
class RangeChoice:
    """One quantizer's outcome, a row of the per-layer table."""

    quantizer: str
    tensor: str  # weight | input | attention operand
    bits: int
    lo: float
    hi: float
    observed_lo: float
    observed_hi: float
    score: float | None  # the metric at the chosen range (mean over channels)
    minmax_score: float | None  # the metric at the observed range, for comparison


def search_range(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, quantizer: Quantizer,
                 metric: RangeMetric, num_candidates: int, independent_ends: bool = False):
    """Best range per row of ``x`` (C, n): returns lo (C,), hi (C,), best score (C,), score at min/max (C,).

    The candidates scale [xmin, xmax] by one factor; with ``independent_ends`` an asymmetric grid then has its
    hi and its lo searched in turn over the same factors with the other end held (two rounds of coordinate
    descent). Each round keeps the current range among its candidates, so the score never gets worse.
    """
    if not metric.search:
        lo, hi = metric.fixed_range(x, xmin, xmax)
        return lo, hi, None, None
    alphas = torch.linspace(1.0, 1.0 / num_candidates, num_candidates, device=x.device)[:, None]
    lo, hi, best, at_minmax = _best_candidates(x, alphas * xmin, alphas * xmax, quantizer, metric)
    if independent_ends and not quantizer.spec.symmetric:
        for _ in range(2):
            lo, hi, best, _ = _best_candidates(x, lo.expand_as(alphas * xmax), alphas * xmax, quantizer, metric)
            lo, hi, best, _ = _best_candidates(x, alphas * xmin, hi.expand_as(alphas * xmin), quantizer, metric)
    return lo, hi, best, at_minmax


def _best_candidates(x: torch.Tensor, cand_lo: torch.Tensor, cand_hi: torch.Tensor, quantizer: Quantizer,
                     metric: RangeMetric):
    """The best of K candidate ranges (K, C) per row of ``x`` (C, n): lo, hi, its score, the first's score."""
    num_candidates = cand_lo.shape[0]
    per_chunk = max(1, _CHUNK_ELEMENTS // x.numel())
    scores = []
    for s in range(0, num_candidates, per_chunk):
        lo, hi = cand_lo[s: s + per_chunk], cand_hi[s: s + per_chunk]
        xq = quantizer.quantize_with(x[None], lo[..., None], hi[..., None])
        scores.append(metric.score(x[None], xq, lo, hi, quantizer.spec))
    scores = torch.cat(scores)  # (K, C)
    best = scores.argmin(dim=0)
    cols = torch.arange(x.shape[0], device=x.device)
    return cand_lo[best, cols], cand_hi[best, cols], scores[best, cols], scores[0]


def describe_quantizer(name: str) -> tuple[str, str]:
    """'up.0.conv1.input_quantizers.1' -> ('up.0.conv1', 'input[1]')."""
    for kind in ("weight_quantizers", "input_quantizers", "output_quantizers"):
        marker = f".{kind}."
        if marker in name:
            layer, part = name.split(marker)
            tensor = kind.split("_")[0] + ("" if part == "0" else f"[{part}]")
            return layer, tensor
    layer, _, operand = name.rpartition(".quantizers.")
    return layer or name, f"attention {operand}"


@torch.no_grad()
def calibrate_(network: nn.Module, forward, calibration: CalibrationSet, search: RangeSearch,
               batch_size: int = 256, progress: bool = True) -> list[RangeChoice]:
    """Set the range of every quantizer in ``network`` from the calibration set, in place.

    ``forward(x, t, cond)`` runs the network; it is called with full precision everywhere while observing.
    Returns one RangeChoice per quantizer.
    """
    started = time.perf_counter()
    device = next(network.parameters()).device
    config = getattr(network, "quant_config", None)
    if config is not None and config.shortcut_split:
        x, t, cond = next(calibration.batches(1, device))
        split_shortcuts_(network, *((x, t) if cond is None else (x, t, cond)))

    layers = {name: m for name, m in network.named_modules() if isinstance(m, QuantLayer)}
    # The network's own input x_t stays in full precision unless the config says otherwise (QuantConfig).
    keep_fp = set()
    if config is not None and not config.network_input:
        x, t, cond = next(calibration.batches(1, device))
        keep_fp = {f"{n}.input_quantizers.{i}" for n in layers_reading_input(network, forward, x, t, cond)
                   for i in range(len(layers[n].input_quantizers))}
    fp_reasons = dict.fromkeys(keep_fp, "reads the network's own input x_t (ops.network_input=false)")
    output_layer = getattr(network, "quant_output_layer", None)
    if output_layer is not None and output_layer in layers and layers[output_layer].output_quantizers:
        name = f"{output_layer}.output_quantizers.0"
        keep_fp.add(name)
        fp_reasons[name] = "the network's output (quantizers on layer outputs leave it unquantized, as the " \
                           "PTQ4DM reference code)"
    weight_quantizers = {f"{n}.weight_quantizers.{i}": (m, i, q) for n, m in layers.items()
                         for i, q in enumerate(m.weight_quantizers)}
    act_quantizers = {n: q for n, q in network.named_modules()
                      if isinstance(q, Quantizer) and n not in weight_quantizers}
    # Start over from full precision: a second calibration of the same network must not observe activations
    # computed with the first one's quantized weights, nor keep its choice of which quantizers stay off.
    for q in [*act_quantizers.values(), *(q for _, _, q in weight_quantizers.values())]:
        q.reset()
    for layer in layers.values():
        layer.unfreeze_weight()

    def batches(desc: str):
        return tqdm(calibration.batches(batch_size, device), desc=desc, total=calibration.num_batches(batch_size),
                    disable=not progress, leave=False)

    if search.act_ema is None:
        for i, (name, q) in enumerate(act_quantizers.items()):
            q.observer = ValueSample(search.max_values, seed=i, name=name)
        try:
            for x, t, cond in batches("calibration statistics"):
                forward(x, t, cond)
        finally:
            observers = {n: q.observer for n, q in act_quantizers.items()}
            for q in act_quantizers.values():
                q.observer = None
        todo = [(n, "act") for n in act_quantizers] + [(n, "weight") for n in weight_quantizers]
    else:
        todo = [(n, "weight") for n in weight_quantizers]  # activations below, with the weights quantized

    choices = []
    for name, kind in tqdm(todo, desc="range search", disable=not progress, leave=False):
        if kind == "act":
            q, obs = act_quantizers[name], observers[name]
            if obs.min is None or name in keep_fp:  # never called (an unused branch), or x_t: full precision
                q.enabled = False
                q.fp_reason = fp_reasons.get(name, "never called during calibration")
                continue
            x, xmin, xmax = obs.values(), obs.min, obs.max
            metric = search.metric
        else:
            layer, part, q = weight_quantizers[name]
            w = layer.weight_part(part).detach().float().transpose(0, layer.out_axis)  # output channels first
            x = w.reshape(w.shape[0], -1)
            xmin, xmax = x.amin(dim=1), x.amax(dim=1)
            metric = search.weight_metric
        if not q.spec.per_channel:
            x, xmin, xmax = x.reshape(1, -1), xmin.min().reshape(1), xmax.max().reshape(1)
        lo, hi, score, base = search_range(x, xmin, xmax, q, metric.for_spec(q.spec), search.num_candidates,
                                           search.independent_ends)
        q.set_range(lo, hi)
        layer_name, tensor = describe_quantizer(name)
        choices.append(RangeChoice(
            quantizer=layer_name, tensor=tensor, bits=q.spec.bits, lo=float(lo.min()), hi=float(hi.max()),
            observed_lo=float(xmin.min()), observed_hi=float(xmax.max()),
            score=None if score is None else float(score.mean()),
            minmax_score=None if base is None else float(base.mean())))
    if search.act_ema is not None:
        choices = _running_activation_ranges(act_quantizers, keep_fp, fp_reasons, search, forward,
                                             batches("calibration (running ranges)")) + choices
    for layer in layers.values():
        layer.freeze_weight()
    network.calibration_seconds = time.perf_counter() - started
    return choices


class RunningRange:
    """Stands in for an activation quantizer during the reference-style calibration: searches the range of
    each tensor it is given, blends it into a running range, and quantizes with that running range."""

    def __init__(self, quantizer: Quantizer, search: RangeSearch, seed: int):
        self.quantizer, self.search = quantizer, search
        self.metric = search.metric.for_spec(quantizer.spec)
        self.generator = torch.Generator().manual_seed(seed)
        self.lo = self.hi = self.observed_lo = self.observed_hi = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().float().reshape(1, -1)
        xmin, xmax = rows.amin(dim=1), rows.amax(dim=1)
        if rows.shape[1] > self.search.max_values:  # a bounded random subset is scored, as in the default search
            pick = torch.randint(rows.shape[1], (self.search.max_values,), generator=self.generator)
            rows = rows[:, pick.to(rows.device)]
        lo, hi, _, _ = search_range(rows, xmin, xmax, self.quantizer, self.metric, self.search.num_candidates,
                                    self.search.independent_ends)
        if self.quantizer.spec.symmetric:  # blend thresholds, as the reference's 1-D symmetric search does
            t = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -t, t
        m = self.search.act_ema
        first = self.lo is None
        self.lo = lo if first else m * lo + (1 - m) * self.lo
        self.hi = hi if first else m * hi + (1 - m) * self.hi
        self.observed_lo = xmin if first else torch.minimum(self.observed_lo, xmin)
        self.observed_hi = xmax if first else torch.maximum(self.observed_hi, xmax)
        return self.quantizer.quantize_with(x.float(), self.lo, self.hi).to(x.dtype)


def _running_activation_ranges(act_quantizers: dict[str, Quantizer], keep_fp: set[str], fp_reasons: dict,
                               search: RangeSearch, forward, batches) -> list[RangeChoice]:
    """Activation ranges the PTQ4DM reference's way (RangeSearch.act_ema): one pass over the calibration
    batches with every quantizer on, each activation quantizer replaced by a RunningRange."""
    running = {}
    for i, (name, q) in enumerate(act_quantizers.items()):
        if name in keep_fp:
            q.enabled, q.fp_reason = False, fp_reasons[name]
        else:
            running[name] = RunningRange(q, search, seed=i)
            q.set_override(running[name])
    try:
        for x, t, cond in batches:
            forward(x, t, cond)
    finally:
        for name in running:
            act_quantizers[name].set_override(None)
    choices = []
    for name, r in running.items():
        q = act_quantizers[name]
        if r.lo is None:
            q.enabled, q.fp_reason = False, "never called during calibration"
            continue
        q.set_range(r.lo, r.hi)
        layer_name, tensor = describe_quantizer(name)
        choices.append(RangeChoice(quantizer=layer_name, tensor=tensor, bits=q.spec.bits, lo=float(r.lo.min()),
                                   hi=float(r.hi.max()), observed_lo=float(r.observed_lo.min()),
                                   observed_hi=float(r.observed_hi.max()), score=None, minmax_score=None))
    return choices
