"""ptq4dm: post-training quantization of diffusion models as a research framework."""

__version__ = "0.1.0"
