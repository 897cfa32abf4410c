"""``quantize_(model, config)``: swap a network's layers for quantized ones, in place.

The swap only places quantizers; their ranges come from calibration (``ptq4dm.calibration.calibrate_``).
Until then every quantizer passes its input through unchanged.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq4dm.quant.attention import QuantAttnProcessor
from ptq4dm.quant.config import QuantConfig
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.quant.quantizer import Quantizer


CONV_KINDS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def quantizable_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the Conv1d/Conv2d/ConvTranspose2d/Linear layers the config quantizes, in registration order."""
    kinds = tuple(k for group, on in ((CONV_KINDS, config.conv), ((nn.Linear,), config.linear)) if on for k in group)
    projections = set() if config.attention_projections else attention_projections(model)
    return [name for name, m in model.named_modules()
            if kinds and isinstance(m, kinds) and name not in projections
            and not any(fnmatch.fnmatch(name, p) for p in config.exclude)]


def attention_projections(model: nn.Module) -> set[str]:
    """The q/k/v/output projection layers of diffusers attention blocks (any layer inside a module with a
    ``to_q`` and an attention processor)."""
    blocks = [name for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_q")]
    return {name for name, m in model.named_modules() if isinstance(m, (*CONV_KINDS, nn.Linear))
            and any(name.startswith(f"{b}.") for b in blocks)}


@dataclass
class Trace:
    """What one forward pass shows of a network: module names in the order first called, and the modules that
    were given the network's own input tensor."""

    order: list[str]
    reads_input: set[str] = field(default_factory=set)


@torch.no_grad()
def trace(model: nn.Module, forward, x: torch.Tensor, *args) -> Trace:
    """Run ``forward(x, *args)`` once with hooks on every module of ``model``."""
    order, reads, seen, handles = [], set(), set(), []
    for name, module in model.named_modules():
        def hook(m, inputs, name=name):
            if name not in seen:
                seen.add(name)
                order.append(name)
            if any(isinstance(a, torch.Tensor) and a.data_ptr() == x.data_ptr() and a.shape == x.shape
                   for a in inputs):
                reads.add(name)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        forward(x, *args)
    finally:
        for h in handles:
            h.remove()
    return Trace(order, reads)


def execution_order(model: nn.Module, forward, *inputs) -> list[str]:
    """Names of ``model``'s modules in the order ``forward(*inputs)`` first calls them (a module called twice
    counts once, at its first call). Modules never called are left out."""
    return trace(model, forward, *inputs).order


def edge_layers(names: list[str], traced: Trace | None) -> set[str]:
    """The network's first and last layers among ``names``: the first executed layer that reads the network's
    input x_t (a UNet runs its time embedding before conv_in, but the image enters at conv_in) and the last
    executed layer; by registration order when there is no trace."""
    if not names:
        return set()
    if traced is None:
        return {names[0], names[-1]}
    position = {name: i for i, name in enumerate(traced.order)}
    executed = sorted((n for n in names if n in position), key=position.__getitem__)
    if not executed:
        return set()
    first = next((n for n in executed if n in traced.reads_input), executed[0])
    return {first, executed[-1]}


def check_exclude(model: nn.Module, patterns, key: str = "QuantConfig.exclude", of: str = "this model") -> None:
    """Refuse ``exclude`` patterns that name no module of ``model`` (a typo would quietly quantize everything);
    ``key`` and ``of`` say in the message which setting and which model (``ops.exclude``, ``model=<name>``)."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"{key}={list(patterns)}: {unmatched} match no module of {of}; allowed are fnmatch "
                         f"patterns of module names, such as {names[:8]}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_(model: nn.Module, config: QuantConfig, traced: Trace | None = None,
              edges: set[str] | None = None, edge_roles: dict[str, list[str]] | None = None) -> nn.Module:
    """Replace the layers ``config`` selects with QuantLayers (and attention processors), in place.

    ``config.first_last_bits`` applies to the network's first and last layers as it executes (``edge_layers``):
    pass ``traced`` (``trace``) or the ``edges`` themselves; without either, registration order decides (which
    in a custom network may put a time-embedding layer "first"). The chosen edges are kept as
    ``model.quant_edges``.
    """
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("model is already quantized")
    check_exclude(model, config.exclude)  # ptq4dm.run checks the same earlier, naming ops.exclude and the model
    names = quantizable_layers(model, config)
    weight_edges = act_edges = set()
    if config.first_last_bits and edge_roles is not None:  # a checkpoint's own choice
        weight_edges, act_edges = set(edge_roles["weight"]), set(edge_roles["act"])
    elif config.first_last_bits and edges is not None:
        weight_edges = act_edges = set(edges)
    elif config.first_last_bits and config.edge_rule == "reference" and names:
        # The PTQ4DM reference code's rule: its first and last weight quantizers and its second-to-last
        # activation quantizer in registration order (quant_model.py:75-86). Its improved-diffusion UNet registers
        # modules in the order they run (time embedding, input blocks, middle, output blocks, out), whereas
        # diffusers registers conv_in first and the up blocks before the mid block, so the run order stands in.
        order = reference_order(names, traced)
        weight_edges, act_edges = {order[0], order[-1]}, set(order[-2:-1])
    elif config.first_last_bits:
        weight_edges = act_edges = edge_layers(names, traced)
    edges = weight_edges | act_edges
    for name in names:
        layer = model.get_submodule(name)
        _set_submodule(model, name, QuantLayer(
            layer, config.weight_spec(config.first_last_bits if name in weight_edges else None),
            config.act_spec(config.first_last_bits if name in act_edges else None), act_on=config.act_placement))
    if config.attn_matmul:
        for name, m in model.named_modules():
            if hasattr(m, "set_processor") and hasattr(m, "to_q") \
                    and not any(fnmatch.fnmatch(name, p) for p in config.exclude):
                m.set_processor(QuantAttnProcessor(config.act_spec()))
    model.quant_config = config
    model.quant_edges = sorted(edges)
    model.quant_edge_roles = {"weight": sorted(weight_edges), "act": sorted(act_edges)}
    model.quant_output_layer = network_output_layer(names, traced, config)
    return model


def reference_order(names: list[str], traced: Trace | None) -> list[str]:
    """``names`` in the order the traced forward runs them (those never run last), else as registered."""
    if traced is None:
        return list(names)
    position = {name: i for i, name in enumerate(traced.order)}
    return sorted(names, key=lambda n: position.get(n, len(position)))


def network_output_layer(names: list[str], traced: Trace | None, config: QuantConfig) -> str | None:
    """With quantizers on layer outputs, the layer whose output is the network's, left unquantized (the
    reference's disable_network_output_quantization): the last one run, or registered when there is no trace."""
    if config.act_placement != "output" or not names:
        return None
    return reference_order(names, traced)[-1]


@torch.no_grad()
def split_shortcuts_(model: nn.Module, *example_args, **example_kwargs) -> dict[str, int]:
    """Shortcut splitting (Q-Diffusion): separate quantizers for the two halves of a UNet skip concat, in the
    layer that reads the raw concatenation.

    In diffusers' up blocks, resnet i takes ``cat([hidden, skip_i])``; only its ``conv_shortcut`` reads that
    tensor as it is (Q-Diffusion's ``nin_shortcut``/``skip_connection``: qdiff/quant_block.py:328 and 109-110
    split it, while ``conv1`` at :315, which reads the concat after GroupNorm and SiLU, is not split; see
    experiments/references/reference_code_facts.md, Q2). One forward pass on an example input reads the skip
    widths; returns {layer name: split channel}.
    """
    skip_widths: dict[str, list[int]] = {}

    def capture(name):
        def hook(module, args, kwargs):
            skips = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
            skip_widths[name] = [s.shape[1] for s in reversed(skips)]
        return hook

    blocks = {name: m for name, m in model.named_modules() if hasattr(m, "resnets") and "Up" in type(m).__name__}
    handles = [b.register_forward_pre_hook(capture(n), with_kwargs=True) for n, b in blocks.items()]
    try:
        model(*example_args, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
    splits = {}
    for block_name, widths in skip_widths.items():
        for i, resnet in enumerate(blocks[block_name].resnets):
            split = resnet.in_channels - widths[i]
            layer = getattr(resnet, "conv_shortcut", None)
            if isinstance(layer, QuantLayer):
                layer.set_split(split)
                splits[f"{block_name}.resnets.{i}.conv_shortcut"] = split
    return splits


@torch.no_grad()
def layers_reading_input(model: nn.Module, forward, x: torch.Tensor, *args) -> list[str]:
    """Names of the QuantLayers that ``forward(x, *args)`` feeds with ``x`` itself (the network's input)."""
    found, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            def hook(module, inputs, name=name):
                if inputs[0].data_ptr() == x.data_ptr() and inputs[0].shape == x.shape:
                    found.append(name)
            handles.append(m.register_forward_pre_hook(hook))
    try:
        forward(x, *args)
    finally:
        for h in handles:
            h.remove()
    return found


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every quantizer on or off (off: the network computes in full precision)."""
    for q in quantizers(model).values():
        q.enabled = enabled


def set_fused_kernels(model: nn.Module, fused: bool) -> None:
    """Fake-quantize CUDA tensors with one compiled kernel (True, the default) or with eager PyTorch ops."""
    for q in quantizers(model).values():
        q.fused = fused
