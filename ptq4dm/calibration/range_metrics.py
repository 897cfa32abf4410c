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
    """Entropy calibration (TensorRT): a ``bins``-bin histogram over the observed range; for a candidate range,
    P is the histogram inside it with the mass outside folded into its edge bins, Q is the inside histogram
    merged into the grid's levels and spread back evenly over each level's non-empty bins; score KL(P || Q).
    Clipping costs through the folded mass, coarse levels through the merging."""

    def __init__(self, bins: int = 2048):
        if bins < 16:
            raise ValueError(f"metric.fn.bins={bins}: allowed is 16 or more")
        self.bins = int(bins)

    def score(self, x, xq, lo, hi, spec):
        levels = spec.qmax - spec.qmin + 1
        x = x.reshape(lo.shape[1], -1)
        out = torch.empty(lo.shape, device=x.device)
        for c in range(x.shape[0]):
            xmin, xmax = float(x[c].min()), float(x[c].max())
            width = max(xmax - xmin, 1e-12)
            hist = torch.histc(x[c].float(), bins=self.bins, min=xmin, max=xmin + width)
            for k in range(lo.shape[0]):
                i0 = int(min(max((float(lo[k, c]) - xmin) / width * self.bins, 0), self.bins - 1))
                i1 = int(min(max(-(-(float(hi[k, c]) - xmin) / width * self.bins // 1), i0 + 1), self.bins))
                inside = hist[i0:i1]
                p = inside.clone()
                p[0] += hist[:i0].sum()
                p[-1] += hist[i1:].sum()
                out[k, c] = _kl(p, _merge_into_levels(inside, levels))
        return out


def _merge_into_levels(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """Sum bins into ``levels`` groups and spread each group's mass evenly over its non-empty bins."""
    m = len(hist)
    if m <= levels:
        return hist.clone()
    level = torch.arange(m, device=hist.device) * levels // m
    nonzero = (hist > 0).float()
    mass = torch.zeros(levels, device=hist.device).index_add_(0, level, hist)
    count = torch.zeros(levels, device=hist.device).index_add_(0, level, nonzero)
    return mass[level] / count[level].clamp_min(1) * nonzero


def _smooth(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Normalise and give empty bins a little mass (taken from the others), as MXNet's and TVM's entropy
    calibration do, so that a bin Q leaves empty costs a bounded amount instead of infinity."""
    p = p / p.sum().clamp_min(1e-12)
    empty = (p == 0).float()
    n_empty = float(empty.sum())
    if n_empty in (0, p.numel()):
        return p
    return (p + eps * empty - eps * n_empty / (p.numel() - n_empty) * (1 - empty)).clamp_min(1e-12)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    mask = p > 0
    p, q = _smooth(p)[mask], _smooth(q)[mask]
    return (p * (p / q).log()).sum()


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
