"""The quantization engine: quantizers, quantized layers and attention, and the ``quantize_`` entry point."""

from ptq4dm.quant.api import (
    quantizable_layers,
    quantize_,
    quantizers,
    set_fused_kernels,
    set_quantization_enabled,
    split_shortcuts_,
)
from ptq4dm.quant.attention import QuantAttnProcessor
from ptq4dm.quant.checkpoint import (
    checkpoint_source,
    load_quantized,
    quantizes_decoder,
    read_quant_config,
    restore_quantized,
    save_quantized,
)
from ptq4dm.quant.config import QuantConfig
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.quant.quantizer import Quantizer, QuantSpec, fake_quantize, grid_params

__all__ = ["QuantAttnProcessor", "QuantConfig", "QuantLayer", "QuantSpec", "Quantizer", "checkpoint_source",
           "fake_quantize", "grid_params", "load_quantized", "quantizable_layers", "quantize_", "quantizers",
           "quantizes_decoder", "read_quant_config", "restore_quantized", "save_quantized", "set_fused_kernels",
           "set_quantization_enabled", "split_shortcuts_"]
