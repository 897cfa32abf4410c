"""Observers record what a quantizer sees during calibration: exact extremes and a random value sample."""

from __future__ import annotations

import torch


class ValueSample:
    """Keeps the exact min/max and a uniform random sample of at most ``budget`` values (per channel if asked).

    ``channel_axis`` None pools the whole tensor; otherwise values are kept per slice along that axis.
    """

    def __init__(self, budget: int = 65536, channel_axis: int | None = None, seed: int = 0):
        self.budget, self.channel_axis = budget, channel_axis
        self.generator = torch.Generator().manual_seed(seed)
        self.parts: list[torch.Tensor] = []
        self.count = 0
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if self.channel_axis is None:
            return x.reshape(1, -1)
        return x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)

    def __call__(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values in calibration statistics")
        rows = self._as_rows(x)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        take = min(rows.shape[1], self.budget)
        idx = torch.randperm(rows.shape[1], generator=self.generator)[:take].to(rows.device)
        self.parts.append(rows[:, idx])
        self.count += take
        if self.count > 4 * self.budget:  # keep memory bounded: thin out what has been kept so far
            self.parts = [self.values()]
            self.count = self.parts[0].shape[1]

    def values(self) -> torch.Tensor:
        """(channels, n) sample of the observed values (channels is 1 when pooled)."""
        if not self.parts:
            raise RuntimeError("observer saw no data")
        allv = torch.cat(self.parts, dim=1)
        if allv.shape[1] > self.budget:
            keep = torch.randperm(allv.shape[1], generator=self.generator)[: self.budget].to(allv.device)
            allv = allv[:, keep]
        return allv
