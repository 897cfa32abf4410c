"""ptq4dm: post-training quantization of diffusion models as a research framework."""

__version__ = "0.1.0"

from ptq4dm.api import QuantizationReport, as_denoiser, quantize  # noqa: E402
from ptq4dm.calibration import CalibrationRecipe, ChannelBalance, RangeSearch  # noqa: E402
from ptq4dm.diffusion import Conditioning, Sampler  # noqa: E402
from ptq4dm.quant import QuantConfig, quantize_  # noqa: E402

__all__ = ["CalibrationRecipe", "ChannelBalance", "Conditioning", "QuantConfig", "QuantizationReport", "RangeSearch", "Sampler", "as_denoiser",
           "quantize", "quantize_"]
