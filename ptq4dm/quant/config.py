"""What to quantize: one small config object, in the shape of torchao's quantization configs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ptq4dm.quant.quantizer import QuantSpec

SAMPLER_OUTPUTS = ("mean", "variance", "x_prev")


@dataclass
class QuantConfig:
    """Bit-widths and the operations that are quantized.

    ``weight_bits`` / ``act_bits`` of None leave weights / activations in full precision. ``first_last_bits``
    raises both to at least that width for the first and last quantized layers (8 in the PTQ4DM reference code).
    ``network_input`` also quantizes the input of the layers that read the network's own input x_t (found at
    calibration; conv_in of a UNet): off by default, as in the PTQ4DM reference code, whose activation
    quantizers sit on layer outputs (Q-Diffusion's sit on layer inputs and do round x_t). At late
    steps x_t differs from the image by noise smaller than an 8-bit step over its range, so rounding it
    erases what the network must predict. ``exclude`` holds
    fnmatch patterns of module names left in full precision. ``sampler_outputs`` lists the sampler quantities
    quantized at ``act_bits`` (PTQ4DM Table 1): any of mean, variance, x_prev.

    The PTQ4DM reference code's quantizer (``ops=ptq4dm_reference``) differs in three placement choices:
    ``act_placement="output"`` puts the activation quantizer on each layer's output instead of its input (the
    network's own output stays unquantized; QDrop/quant/quant_layer.py:365-380 and quant_model.py:104-109 there);
    ``edge_rule="reference"`` raises to ``first_last_bits`` the weights of its first and last layers and the
    activation quantizer of its second-to-last layer, in its registration order (quant_model.py:75-86; on its
    improved-diffusion UNet the first is the time-embedding Linear), for which the order a forward pass runs the
    layers stands in, instead of the first layer reading x_t and the last layer; ``attention_projections=False`` leaves the q/k/v/out projections of
    attention blocks in full precision, as its Conv1d qkv/proj_out were never replaced (quant_model.py:33-46).
    """

    weight_bits: int | None = 8
    act_bits: int | None = 8
    weight_symmetric: bool = False
    weight_per_channel: bool = True
    act_symmetric: bool = False
    conv: bool = True
    linear: bool = True
    attn_matmul: bool = False
    first_last_bits: int | None = 8
    network_input: bool = False
    shortcut_split: bool = False
    exclude: tuple[str, ...] = ()
    sampler_outputs: tuple[str, ...] = field(default_factory=tuple)
    act_placement: str = "input"
    edge_rule: str = "executed"
    attention_projections: bool = True

    def __post_init__(self):
        for key, allowed in (("act_placement", ("input", "output")), ("edge_rule", ("executed", "reference"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: allowed are {list(allowed)}")
        if self.act_placement == "output" and (self.shortcut_split or self.network_input):
            raise ValueError("act_placement='output' quantizes layer outputs: shortcut_split and network_input, "
                             "which concern layer inputs, must be false")
        for key in ("weight_bits", "act_bits", "first_last_bits"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or not 2 <= value <= 16):
                raise ValueError(f"{key}={value!r}: allowed are whole numbers from 2 to 16, or null (full precision)")
        self.exclude = tuple(self.exclude)
        self.sampler_outputs = tuple(self.sampler_outputs)
        unknown = set(self.sampler_outputs) - set(SAMPLER_OUTPUTS)
        if unknown:
            raise ValueError(f"sampler_outputs={list(self.sampler_outputs)}: unknown {sorted(unknown)}; "
                             f"allowed are {list(SAMPLER_OUTPUTS)}")
        if self.attn_matmul and self.act_bits is None:
            raise ValueError("attn_matmul=true needs act_bits: the matmul operands are activations")

    def for_decoder(self) -> QuantConfig:
        """The same bits and layer kinds for a VAE decoder (``ops.decoder``): it has no UNet skips to split and
        no sampler outputs, and ``exclude`` patterns name the UNet's modules, not the decoder's."""
        return replace(self, shortcut_split=False, exclude=(), sampler_outputs=())

    def weight_spec(self, bits: int | None = None) -> QuantSpec | None:
        """Weights' spec; ``bits`` raises the width (edge layers) but never turns quantization on."""
        if self.weight_bits is None:
            return None
        return QuantSpec(max(bits or 0, self.weight_bits), self.weight_symmetric, self.weight_per_channel)

    def act_spec(self, bits: int | None = None) -> QuantSpec | None:
        """Activations' spec; ``bits`` raises the width but never turns quantization on."""
        if self.act_bits is None:
            return None
        return QuantSpec(max(bits or 0, self.act_bits), self.act_symmetric, per_channel=False)
