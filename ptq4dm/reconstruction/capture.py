"""A unit's inputs and outputs over the calibration set, captured with hooks at the unit itself.

The network runs as in sampling (``forward(x, t, cond)``), so a unit gets exactly its real arguments: hidden
states, the time embedding, the skip tensors an up block concatenated, encoder_hidden_states. A forward stops
as soon as the unit has run (nothing downstream is computed). Tensors whose first dimension is the batch are
concatenated over batches; other arguments are kept from the first batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class _Stop(Exception):
    """Raised in a hook to end a forward once the unit has been seen."""


@dataclass
class Captured:
    args: list = field(default_factory=list)  # positional arguments, batch tensors concatenated
    kwargs: dict = field(default_factory=dict)
    output: torch.Tensor | None = None
    size: int = 0

    def batch(self, idx: torch.Tensor, device) -> tuple[list, dict]:
        """The arguments of samples ``idx``, on ``device``."""
        pick = (lambda v: v[idx].to(device) if isinstance(v, torch.Tensor) and v.dim() and len(v) == self.size
                else v)
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def _keep(value, store_device):
    return value.detach().to(store_device) if isinstance(value, torch.Tensor) else value


def _join(parts: list, size: int):
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.dim() and all(isinstance(p, torch.Tensor) for p in parts) \
            and sum(len(p) for p in parts) == size:
        return torch.cat(parts)
    return first


@torch.no_grad()
def capture(network: nn.Module, unit_name: str, forward, batches, inputs: bool = True, outputs: bool = False,
            store_device="cpu") -> Captured:
    """The inputs (args, kwargs) and/or the output of ``network``'s module ``unit_name`` for every batch of
    ``batches`` (tuples for ``forward``)."""
    module = network.get_submodule(unit_name)
    args_parts, kwargs_parts, out_parts, sizes = [], [], [], []

    def pre(m, args, kwargs):
        if inputs:
            args_parts.append([_keep(a, store_device) for a in args])
            kwargs_parts.append({k: _keep(v, store_device) for k, v in kwargs.items()})
        if not outputs:
            raise _Stop

    def post(m, args, kwargs, out):
        out_parts.append(_keep(out, store_device))
        raise _Stop

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if outputs:
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        for batch in batches:
            sizes.append(len(batch[0]))
            try:
                forward(*batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    size = sum(sizes)
    got = Captured(size=size)
    if inputs:
        if len(args_parts) != len(sizes):
            raise RuntimeError(f"{unit_name} was not called once per batch (called {len(args_parts)} times for "
                               f"{len(sizes)} batches): it cannot be reconstructed as a unit")
        got.args = [_join([p[i] for p in args_parts], size) for i in range(len(args_parts[0]))]
        got.kwargs = {k: _join([p[k] for p in kwargs_parts], size) for k in kwargs_parts[0]}
    if outputs:
        got.output = torch.cat(out_parts)
    return got
