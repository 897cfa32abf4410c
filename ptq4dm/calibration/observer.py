"""Observers record what a quantizer sees during calibration: exact extremes and a random value sample."""

from __future__ import annotations

import torch


class ValueSample:
    """Keeps the exact min/max and a uniform random sample of at most ``budget`` values (per channel if asked).

    Each call contributes a random subset of its values together with how many values each kept one stands
    for, and the final sample is drawn in proportion to that, so early and late calls (early and late
    sampler steps, say) are represented as often as they were seen. ``channel_axis`` None pools the tensor.
    """

    def __init__(self, budget: int = 65536, channel_axis: int | None = None, seed: int = 0, name: str = "?"):
        self.budget, self.channel_axis, self.name, self.seed = budget, channel_axis, name, seed
        self.generator = torch.Generator().manual_seed(seed)  # the final draw (CPU, small)
        self._device_generators: dict[torch.device, torch.Generator] = {}  # per-call subsets, beside the data
        self.parts: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []  # values represented by each kept value
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
            raise FloatingPointError(f"non-finite values in the calibration statistics of {self.name}")
        rows = self._as_rows(x)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        take = min(rows.shape[1], self.budget)
        self.parts.append(rows if take == rows.shape[1] else rows[:, self._subset(rows.shape[1], take, rows.device)])
        self.weights.append(torch.full((take,), rows.shape[1] / take))
        self.count += take
        if self.count > 4 * self.budget:  # keep memory bounded: thin out what has been kept so far
            values, represented = self._draw()
            self.parts, self.weights, self.count = [values], [represented], values.shape[1]

    def _subset(self, n: int, take: int, device: torch.device) -> torch.Tensor:
        """``take`` of ``n`` positions, uniformly with replacement, drawn on the data's device: a CPU randperm
        of a whole activation (tens of millions of values) per call would dominate GPU calibration time."""
        if device not in self._device_generators:
            self._device_generators[device] = torch.Generator(device).manual_seed(self.seed)
        return torch.randint(n, (take,), generator=self._device_generators[device], device=device)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """About ``budget`` values, each kept with probability proportional to what it stands for (Poisson
        sampling); the survivors' weights are divided by their keep probability, so totals stay unbiased."""
        values, weights = torch.cat(self.parts, dim=1), torch.cat(self.weights)
        if values.shape[1] <= self.budget:
            return values, weights
        p = (weights * self.budget / weights.sum()).clamp(max=1.0)
        keep = torch.rand(len(p), generator=self.generator) < p
        return values[:, keep.to(values.device)], weights[keep] / p[keep]

    def values(self) -> torch.Tensor:
        """(channels, n) sample of the observed values (channels is 1 when pooled)."""
        if not self.parts:
            raise RuntimeError("observer saw no data")
        return self._draw()[0]
