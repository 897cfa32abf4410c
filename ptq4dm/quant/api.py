"""``quantize_(model, config)``: swap a network's layers for quantized ones, in place.

The swap only places quantizers; their ranges come from calibration (``ptq4dm.calibration.calibrate_``).
Until then every quantizer passes its input through unchanged.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ptq4dm.quant.attention import QuantAttnProcessor
from ptq4dm.quant.config import QuantConfig
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.quant.quantizer import Quantizer


def quantizable_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the Conv2d/Linear layers the config quantizes, in registration order."""
    kinds = tuple(k for k, on in ((nn.Conv2d, config.conv), (nn.Linear, config.linear)) if on)
    return [name for name, m in model.named_modules()
            if kinds and isinstance(m, kinds) and not any(fnmatch.fnmatch(name, p) for p in config.exclude)]


def unmatched_patterns(model: nn.Module, patterns) -> list[str]:
    """The ``exclude`` patterns that name no module of ``model`` (a typo would quietly quantize everything)."""
    names = [name for name, _ in model.named_modules() if name]
    return [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in names)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the layers ``config`` selects with QuantLayers (and attention processors), in place."""
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("model is already quantized")
    names = quantizable_layers(model, config)
    edges = {names[0], names[-1]} if names and config.first_last_bits else set()
    for name in names:
        bits = config.first_last_bits if name in edges else None
        layer = model.get_submodule(name)
        _set_submodule(model, name, QuantLayer(layer, config.weight_spec(bits), config.act_spec(bits)))
    if config.attn_matmul:
        for name, m in model.named_modules():
            if hasattr(m, "set_processor") and hasattr(m, "to_q") \
                    and not any(fnmatch.fnmatch(name, p) for p in config.exclude):
                m.set_processor(QuantAttnProcessor(config.act_spec()))
    model.quant_config = config
    return model


@torch.no_grad()
def split_shortcuts_(model: nn.Module, *example_args, **example_kwargs) -> dict[str, int]:
    """Shortcut splitting (Q-Diffusion): separate quantizers for the two halves of each UNet skip concat.

    In diffusers' up blocks, resnet i takes ``cat([hidden, skip_i])``; its ``conv1`` (after norm and SiLU,
    which keep the channel order) and ``conv_shortcut`` see that layout. One forward pass on an example input
    reads the skip widths; returns {layer name: split channel}.
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
            for attr in ("conv1", "conv_shortcut"):
                layer = getattr(resnet, attr, None)
                if isinstance(layer, QuantLayer):
                    layer.set_split(split)
                    splits[f"{block_name}.resnets.{i}.{attr}"] = split
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
