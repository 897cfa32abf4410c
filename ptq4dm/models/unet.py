"""Epsilon-prediction UNets in the google/ddpm-cifar10-32 topology, and the embedded pretrained ones.

A model on disk is a diffusers pipeline folder: ``unet/`` (config.json + safetensors) and ``scheduler/``
(the training noise schedule), the same layout as ``google/ddpm-cifar10-32`` on the Hugging Face hub. Latent
and text-conditional pipeline folders (``vae/``, ``text_encoder/``) load through ``ptq4dm.models.pipeline``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDPMScheduler, UNet2DModel

EMBEDDED_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"

# google/ddpm-cifar10-32's UNet config, minus the width, which each model chooses.
DDPM_CIFAR10_LAYOUT = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    mid_block_scale_factor=1,
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    time_embedding_type="positional",
)


@dataclass
class DiffusionModel:
    """A network and the noise schedule it was trained with (whose prediction_type says what the network
    returns: the noise, v or x_0)."""

    unet: torch.nn.Module  # a diffusers UNet2DModel, or any f(x, t) network
    scheduler: DDPMScheduler
    name: str = "model"
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of x_t; read from a diffusers config when None
    decoder: torch.nn.Module | None = None  # latent models: latents -> images in [-1, 1] (full precision)
    conditioner: Callable | None = None  # conditional models: image indices -> Conditioning (conditioners.py)

    def __post_init__(self):
        if self.image_shape is None:
            cfg = getattr(self.unet, "config", None)
            if cfg is None:
                raise ValueError("image_shape (C, H, W) is needed for a network without a diffusers config")
            size = cfg.sample_size  # an int, or (H, W) for some diffusers models
            self.image_shape = (cfg.in_channels, *((size, size) if isinstance(size, int) else size))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


def build_unet(block_out_channels: tuple[int, ...], norm_num_groups: int, dropout: float = 0.0,
               **overrides) -> UNet2DModel:
    """A randomly initialised UNet2DModel in the ddpm-cifar10 topology at the given width."""
    config = {**DDPM_CIFAR10_LAYOUT, **overrides}
    return UNet2DModel(block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups,
                       dropout=dropout, **config)


def _is_pipeline(folder: Path) -> bool:
    return (folder / "unet" / "config.json").is_file()


def _from_hub_cache(repo_id: str) -> Path | None:
    """A hub model already in the local Hugging Face cache (never downloaded here)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: reported by the caller
        return None


def resolve_model_dir(path: str | Path) -> Path:
    """An embedded model name (``tiny_cifar10``), a pipeline folder, or a hub id in the local HF cache."""
    candidates = [EMBEDDED_MODELS_DIR / str(path), Path(path).expanduser()]
    for folder in candidates:
        if _is_pipeline(folder):
            return folder
    cached = _from_hub_cache(str(path)) if str(path).count("/") == 1 and not Path(path).exists() else None
    if cached is not None and _is_pipeline(cached):
        return cached
    embedded = sorted(p.name for p in EMBEDDED_MODELS_DIR.iterdir() if _is_pipeline(p)) \
        if EMBEDDED_MODELS_DIR.is_dir() else []
    raise FileNotFoundError(
        f"no diffusion model at {str(path)!r}: looked for a pipeline folder (unet/config.json and its weights) "
        f"there, among the embedded models {embedded}, and for the hub id in the Hugging Face cache "
        f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}). To get a hub model, on a machine "
        f"with network: `huggingface-cli download {path} --local-dir <dir>`, then model.pretrained=<dir>"
    )


def load_component_strictly(cls, folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers model from its folder, every tensor accounted for: diffusers itself only warns about missing
    weights (and initializes them randomly), which would quietly quantize a different network. Wrong shapes
    already fail inside diffusers."""
    model, info = cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False,
                                      output_loading_info=True)
    check_loading_info(info, folder, cls.__name__)
    return model.eval().requires_grad_(False)


def check_loading_info(info: dict, folder: Path, class_name: str) -> None:
    """Fail on the missing, unused or reshaped tensors that a diffusers or transformers ``from_pretrained``
    reports with ``output_loading_info=True``."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    reshaped = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if missing or unexpected or reshaped:
        raise ValueError(f"{folder} does not fit {class_name} with its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {reshaped[:5]} "
                         f"({len(missing)}/{len(unexpected)}/{len(reshaped)} tensors)")


def load_diffusion_model(path: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """Load a UNet and its noise schedule from a local pipeline folder, never from the network."""
    folder = resolve_model_dir(path)
    unet = load_component_strictly(UNet2DModel, folder / "unet", dtype)
    return DiffusionModel(unet=unet, scheduler=load_noise_scheduler(folder), name=folder.name)


def load_noise_scheduler(folder: Path) -> DDPMScheduler:
    """The training noise schedule of a pipeline folder, whichever scheduler class saved it (Stable Diffusion
    ships a PNDM config): betas, T and prediction type carry over; each sampler builds its own from it."""
    config = DDPMScheduler.load_config(folder / "scheduler", local_files_only=True)
    return DDPMScheduler.from_config(config)


def save_diffusion_model(model: DiffusionModel, folder: str | Path, dtype: torch.dtype | None = torch.float16,
                         max_shard_size: str = "100MB", extra: dict | None = None) -> Path:
    """Write the diffusers pipeline layout (``model_index.json``, ``unet/``, ``scheduler/``)."""
    folder = Path(folder)
    unet = model.unet if dtype is None else _copy_to_dtype(model.unet, dtype)
    unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size=max_shard_size)
    model.scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": _diffusers_version(),
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if extra is not None:
        (folder / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    return folder


def _copy_to_dtype(unet: UNet2DModel, dtype: torch.dtype) -> UNet2DModel:
    copy = UNet2DModel.from_config(unet.config)
    copy.load_state_dict(unet.state_dict())
    return copy.to(dtype)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
