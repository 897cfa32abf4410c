"""Calibration metrics: how a candidate clipping range is scored (lower is better), or a fixed range rule.

``score(x, xq, lo, hi, spec)`` gets the observed values ``x`` (C, n), their fake-quantized versions under K
candidate ranges ``xq`` (K, C, n) and the candidates ``lo``/``hi`` (K, C); it returns (K, C) scores. A new
metric is one subclass here plus one YAML file in ``conf/metric/``.
"""

from __future__ import annotations

import torch

from ptq4dm.quant.quantizer import QuantSpec


class RangeMetric:
    search = True  # False: the range comes from ``fixed_range`` and no candidates are scored
    name = "metric"

    def score(self, x: torch.Tensor, xq: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              spec: QuantSpec) -> torch.Tensor:
        raise NotImplementedError

    def fixed_range(self, x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class LpDistance(RangeMetric):
    """mean |x - Q(x)|^p: p=2 is MSE, p=1 is L1; the PTQ4DM reference code uses p=2.4."""

    def __init__(self, p: float = 2.4):
        if not p > 0:
            raise ValueError(f"metric.p={p}: allowed is a positive number")
        self.p = float(p)

    def score(self, x, xq, lo, hi, spec):
        return (xq - x).abs().pow(self.p).mean(dim=-1)


class CosineDistance(RangeMetric):
    """1 - cosine similarity between x and Q(x)."""

    def score(self, x, xq, lo, hi, spec):
        return 1 - torch.nn.functional.cosine_similarity(xq, x.expand_as(xq), dim=-1, eps=1e-12)


class PearsonDistance(RangeMetric):
    """1 - Pearson correlation between x and Q(x)."""

    def score(self, x, xq, lo, hi, spec):
        xc = x - x.mean(dim=-1, keepdim=True)
        qc = xq - xq.mean(dim=-1, keepdim=True)
        r = (xc * qc).sum(-1) / (xc.norm(dim=-1) * qc.norm(dim=-1)).clamp_min(1e-12)
        return 1 - r


class KLDivergence(RangeMetric):
    """Entropy calibration (TensorRT style): KL(P || Q) between the histogram P of x clipped to the candidate
    range (outliers folded into the edge bins) and Q, the same histogram merged into the grid's levels and
    spread back evenly over each level's non-empty bins."""

    def __init__(self, bins_per_level: int = 8, max_bins: int = 2048):
        self.bins_per_level, self.max_bins = bins_per_level, max_bins

    def score(self, x, xq, lo, hi, spec):
        levels = spec.qmax - spec.qmin + 1
        per_level = max(1, min(self.bins_per_level, self.max_bins // levels))
        bins = levels * per_level
        lo, hi = lo[..., None], hi[..., None]  # (K, C, 1)
        clipped = torch.minimum(torch.maximum(x, lo), hi)  # outliers land in the edge bins
        idx = ((clipped - lo) / (hi - lo).clamp_min(1e-12) * bins).long().clamp_(0, bins - 1)
        p = torch.zeros(*idx.shape[:2], bins, device=x.device).scatter_add_(2, idx, torch.ones_like(clipped))
        p = p.view(*p.shape[:2], levels, per_level)
        nonzero = (p > 0).float()
        q = p.sum(-1, keepdim=True) / nonzero.sum(-1, keepdim=True).clamp_min(1) * nonzero
        p, q = p.flatten(2), q.flatten(2)
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
        return torch.where(p > 0, p * (p / q.clamp_min(1e-30)).log(), torch.zeros_like(p)).sum(-1)


class MinMax(RangeMetric):
    """No search: the observed minimum and maximum."""

    search = False

    def fixed_range(self, x, xmin, xmax):
        return xmin, xmax


class Percentile(RangeMetric):
    """No search: the ``q``-th and (100-q)-th percentiles of the observed values."""

    search = False

    def __init__(self, q: float = 99.99):
        if not 50 < q <= 100:
            raise ValueError(f"metric.q={q}: allowed is a percentile in (50, 100]")
        self.q = float(q)

    def fixed_range(self, x, xmin, xmax):
        hi = torch.quantile(x, self.q / 100, dim=1)
        lo = torch.quantile(x, 1 - self.q / 100, dim=1)
        return lo, hi
