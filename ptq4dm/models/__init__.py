from ptq4dm.models.schedule import build_noise_scheduler, scheduler_config
from ptq4dm.models.unet import (
    DDPM_CIFAR10_LAYOUT,
    EMBEDDED_MODELS_DIR,
    DiffusionModel,
    build_unet,
    load_diffusion_model,
    save_diffusion_model,
)

__all__ = [
    "DDPM_CIFAR10_LAYOUT",
    "EMBEDDED_MODELS_DIR",
    "DiffusionModel",
    "build_noise_scheduler",
    "build_unet",
    "load_diffusion_model",
    "save_diffusion_model",
    "scheduler_config",
]
