"""What reconstruction optimises one at a time: units (blocks or single layers), in the order the network runs.

A unit is the outermost module of a block type (diffusers' ResnetBlock2D, Attention, BasicTransformerBlock,
Downsample2D, Upsample2D, TimestepEmbedding; any class name can be added) that holds quantized layers, or a
quantized layer that belongs to no such block (conv_in, conv_out, a custom network's layers). Units are sorted
by when the network first calls them (``execution_order``), so that each one is reconstructed after everything
upstream of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptq4dm.quant.modules import QuantLayer

BLOCK_TYPES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D",
               "TimestepEmbedding")


@dataclass
class Unit:
    name: str  # module name, the same in the full-precision network and its quantized copy
    module: nn.Module  # in the quantized network
    layers: list[str]  # the QuantLayers inside (full names)
    kind: str  # the block's class name, or "layer"


def find_units(qmodel: nn.Module, order: list[str], block_types: tuple[str, ...] | None = BLOCK_TYPES) -> list[Unit]:
    """Units of ``qmodel`` in execution order (``order``: names of modules as first called). With
    ``block_types`` None every quantized layer is its own unit (layer-wise reconstruction)."""
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    position = {name: i for i, name in enumerate(order)}
    units, covered = [], set()
    for name, module in qmodel.named_modules():
        if block_types is None or type(module).__name__ not in block_types:
            continue
        if any(name.startswith(u.name + ".") for u in units):  # inside a block already taken: outermost wins
            continue
        inner = [n for n in layers if n.startswith(name + ".")]
        if inner and name in position:
            units.append(Unit(name, module, inner, type(module).__name__))
            covered.update(inner)
    units += [Unit(n, m, [n], "layer") for n, m in layers.items() if n not in covered and n in position]
    return sorted(units, key=lambda u: position[u.name])
