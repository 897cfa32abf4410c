"""The model a job uses, from its ``model/`` config: an embedded or on-disk diffusers pipeline folder
(``model.pretrained``; latent and conditional ones with ``model.conditioning``), your own network
(``model.factory`` with ``_target_``, ``model.checkpoint``), or an improved-diffusion checkpoint
(``model.improved_diffusion`` with its flags, ``model.checkpoint``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from ptq4dm.models.improved_diffusion import load_improved_diffusion_model
from ptq4dm.models.pipeline import load_pipeline_model
from ptq4dm.models.unet import DiffusionModel, build_noise_scheduler, resolve_model_dir
from ptq4dm.utils.checkpoints import load_checkpoint


def load_model(cfg: DictConfig) -> DiffusionModel:
    if cfg.get("improved_diffusion") is not None:
        return load_improved_diffusion_model(
            cfg.get("checkpoint"), OmegaConf.to_container(cfg.improved_diffusion, resolve=True),
            OmegaConf.to_container(cfg.scheduler, resolve=True), cfg.name, download_url=cfg.get("download_url"),
            checkpoint_env=cfg.get("checkpoint_env"), trusted=cfg.get("trust_checkpoint", False))
    if cfg.get("factory") is None:
        conditioning = cfg.get("conditioning")
        return load_pipeline_model(cfg.pretrained, None if conditioning is None else
                                   OmegaConf.to_container(conditioning, resolve=True),
                                   decode_batch_size=cfg.get("decode_batch_size", 32))
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
        files = [folder / "scheduler" / "scheduler_config.json"]
        for sub in ("unet", "vae", "vqvae", "text_encoder"):  # the networks an image depends on
            if (folder / sub).is_dir():
                files += sorted((folder / sub).glob("*.safetensors")) + [folder / sub / "config.json"]
        conditioning = cfg.get("conditioning")
        conditioning = {} if conditioning is None else OmegaConf.to_container(conditioning, resolve=True)
        h.update(json.dumps(conditioning, sort_keys=True).encode())
    else:
        h.update(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode())
        files = [Path(cfg.checkpoint).expanduser()] if cfg.get("checkpoint") else []
    for f in files:
        _update_with_file(h, f)
    return h.hexdigest()


def _update_with_file(h, path: Path, whole_up_to: int = 2**28) -> None:
    """A file's bytes; beyond 256 MiB (Stable Diffusion's weights) its size, first and last 16 MiB, which is
    enough to tell checkpoints apart without reading gigabytes at every job."""
    size = path.stat().st_size
    if size <= whole_up_to:
        h.update(path.read_bytes())
        return
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(2**24))
        f.seek(size - 2**24)
        h.update(f.read(2**24))
