"""The model a job uses, from its ``model/`` config: an embedded or on-disk diffusers pipeline folder
(``model.pretrained``), your own network (``model.factory`` with ``_target_``, ``model.checkpoint``), or an
improved-diffusion checkpoint (``model.improved_diffusion`` with its flags, ``model.checkpoint``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from ptq4dm.models.improved_diffusion import load_improved_diffusion_model
from ptq4dm.models.unet import DiffusionModel, build_noise_scheduler, load_diffusion_model, resolve_model_dir
from ptq4dm.utils.checkpoints import load_checkpoint


def load_model(cfg: DictConfig) -> DiffusionModel:
    if cfg.get("improved_diffusion") is not None:
        return load_improved_diffusion_model(
            cfg.get("checkpoint"), OmegaConf.to_container(cfg.improved_diffusion, resolve=True),
            OmegaConf.to_container(cfg.scheduler, resolve=True), cfg.name, download_url=cfg.get("download_url"),
            checkpoint_env=cfg.get("checkpoint_env"), trusted=cfg.get("trust_checkpoint", False))
    if cfg.get("factory") is None:
        return load_diffusion_model(cfg.pretrained)
    net = instantiate(cfg.factory)
    if cfg.get("checkpoint"):
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint={str(path)!r} does not exist")
        state = load_file(str(path)) if path.suffix == ".safetensors" else load_checkpoint(
            path, cfg.get("trust_checkpoint", False), "model.trust_checkpoint")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        net.load_state_dict(state, strict=True)  # every tensor used, every shape checked
    net.eval().requires_grad_(False)
    scheduler = build_noise_scheduler(**cfg.scheduler)
    return DiffusionModel(net, scheduler, cfg.name, image_shape=tuple(cfg.image_shape))


def model_identity(cfg: DictConfig) -> str:
    """A digest of everything of the model that shapes its samples (for caches)."""
    h = hashlib.sha1()
    if cfg.get("factory") is None and cfg.get("improved_diffusion") is None:
        folder = resolve_model_dir(cfg.pretrained)
        files = sorted((folder / "unet").glob("*.safetensors")) + [folder / "unet" / "config.json",
                                                                   folder / "scheduler" / "scheduler_config.json"]
    else:
        h.update(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode())
        files = [Path(cfg.checkpoint).expanduser()] if cfg.get("checkpoint") else []
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()
