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

    def for_spec(self, spec: QuantSpec) -> "RangeMetric":
        """The metric a quantizer of ``spec`` uses (itself; ByBitWidth picks by bit-width)."""
        return self

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
        # |d|^p as exp(p log|d|) in place (log 0 = -inf gives 0): a fractional pow is several times slower on a
        # CPU, and the candidates' (K, C, n) differences are the range search's largest tensor.
        d = (xq - x).abs_()
        if self.p.is_integer():
            return d.pow_(self.p).mean(dim=-1)
        return d.log_().mul_(self.p).exp_().mean(dim=-1)


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
    """Entropy calibration (TensorRT): ``bins`` histogram bins over the observed range; for a candidate range,
    P is the histogram of the values over it (values outside folded into its edge bins: clipping), and Q the
    histogram of the values inside merged into the grid's levels and spread back evenly over each level's
    non-empty bins (rounding); score KL(P || Q).

    A candidate spanning fewer than ``2 * levels`` of those bins gets its own histogram of ``2 * levels`` bins
    over its range: at the shared resolution such a candidate had no more bins than levels, so Q equalled P and
    rounding cost nothing (a narrow range was scored for clipping only). Candidates and channels are scored at
    once, without a Python loop or a device sync per candidate."""

    def __init__(self, bins: int = 2048):
        if bins < 16:
            raise ValueError(f"metric.fn.bins={bins}: allowed is 16 or more")
        self.bins = int(bins)

    def score(self, x, xq, lo, hi, spec):
        levels = spec.qmax - spec.qmin + 1
        k, c = lo.shape
        x = x.reshape(c, -1).float()
        shared = (x.amax(1) - x.amin(1)).clamp_min(1e-12) / self.bins  # (C,) the shared bin width
        width = (hi - lo).clamp_min(1e-12)  # (K, C)
        # Bins per candidate: the shared resolution, or 2 per level where that is coarser (at most 8 * bins: for
        # wide grids, 12 bits and up, rounding is below any histogram's resolution and stays unscored).
        m = (width / shared).round()
        nb = torch.maximum(m, torch.minimum(torch.full_like(m, 2.0 * levels), torch.full_like(m, 8.0 * self.bins)))
        nb = nb.long()
        most = int(nb.max())
        pos = (x[None] - lo[..., None]) / width[..., None] * nb[..., None]  # (K, C, n) in bins of the candidate
        row = torch.arange(k * c, device=x.device).view(k, c, 1) * most
        index = torch.minimum(pos.floor().clamp_(min=0).long(), nb[..., None] - 1) + row
        p = torch.bincount(index.flatten(), minlength=k * c * most).view(k, c, most).float()
        inside = (pos >= 0) & (pos < nb[..., None])
        q_in = torch.bincount(index[inside], minlength=k * c * most).view(k, c, most).float()
        j = torch.arange(most, device=x.device)
        valid = j < nb[..., None]  # (K, C, most): the candidate's own bins
        level = torch.where(valid, j * levels // nb[..., None], levels)  # bins past nb go to a discarded group
        nonzero = (q_in > 0).float()
        mass = torch.zeros(k, c, levels + 1, device=x.device).scatter_add_(2, level, q_in)
        count = torch.zeros(k, c, levels + 1, device=x.device).scatter_add_(2, level, nonzero)
        q = mass.gather(2, level) / count.gather(2, level).clamp_min(1) * nonzero
        return _kl_rows(p, q, valid)


def _smooth_rows(p: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Normalise each row over its ``valid`` bins and give the empty ones a little mass (taken from the others),
    as MXNet's and TVM's entropy calibration do, so that a bin Q leaves empty costs a bounded amount instead of
    infinity."""
    p = p * valid / (p * valid).sum(-1, keepdim=True).clamp_min(1e-12)
    empty = ((p == 0) & valid).float()
    n_empty = empty.sum(-1, keepdim=True)
    n_full = (valid.sum(-1, keepdim=True) - n_empty).clamp_min(1)
    smoothed = p + eps * empty - eps * n_empty / n_full * (p > 0).float()
    return torch.where(n_empty == 0, p, smoothed).clamp_min(1e-12)


def _kl_rows(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dimension, only over the bins P holds mass in."""
    ps, qs = _smooth_rows(p, valid), _smooth_rows(q, valid)
    return torch.where(p > 0, ps * (ps / qs).log(), torch.zeros_like(ps)).sum(-1)


class ByBitWidth(RangeMetric):
    """Weights' default (``weight_metric=auto``): the Lp search (``p``) on grids of ``min_bits`` or more, the
    observed per-channel min/max below. Measured on small_cifar10 at W4A8 (H200, 2000 images, FP 29.2): the
    per-channel Lp search gave FID 180.7 against 54.9 with min/max; at W8A8 the search is what reached +0.99 FID
    at 10k images (experiments/results/main_10k)."""

    def __init__(self, min_bits: int = 8, p: float = 2.4):
        if not isinstance(min_bits, int) or not 2 <= min_bits <= 16:
            raise ValueError(f"weight_metric.fn.min_bits={min_bits!r}: allowed is a whole number from 2 to 16")
        self.min_bits, self.search_metric, self.minmax = min_bits, LpDistance(p), MinMax()

    def for_spec(self, spec: QuantSpec) -> RangeMetric:
        return self.search_metric if spec.bits >= self.min_bits else self.minmax

    def __repr__(self) -> str:
        return f"ByBitWidth(min_bits={self.min_bits}, p={self.search_metric.p})"


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
