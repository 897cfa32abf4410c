"""The network's compute precision: an autocast dtype on CUDA (``eval.precision``), float32 elsewhere."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    precision = str(precision)
    if precision not in DTYPES:
        raise ValueError(f"eval.precision={precision!r} is not one of {sorted(DTYPES)}")
    return precision


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """``precision`` on CUDA, float32 elsewhere (the CPU always computes in float32)."""
    dtype = DTYPES[check_precision(precision)] if device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def denoiser(network: nn.Module, precision: str = "fp32") -> Callable:
    """``f(x, t[, cond]) -> eps`` as a float32 tensor, the network run in ``precision``, a scalar t broadcast
    over the batch: what calibration and sampling call."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        with autocast(precision, x.device):
            out = network(x, t) if cond is None else network(x, t, cond)
        return (out.sample if hasattr(out, "sample") else out).float()

    return denoise
