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
from torch import nn

from ptq4dm.models.improved_diffusion import load_improved_diffusion_model
from ptq4dm.models.pipeline import load_pipeline_model
from ptq4dm.models.schedule import build_noise_scheduler, given_arguments, scheduler_config
from ptq4dm.models.unet import DiffusionModel, resolve_model_dir
from ptq4dm.utils.checkpoints import read_state_dict


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
    net = instantiate(cfg.factory)  # user code, by design (README: security notes)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model.factory._target_={cfg.factory.get('_target_')!r} returned a "
                        f"{type(net).__name__}: expected a torch.nn.Module computing f(x, t) -> eps (or v, or x_0, "
                        "as model.scheduler.prediction_type says)")
    if cfg.get("checkpoint"):
        state = read_state_dict(cfg.checkpoint, "model.checkpoint", cfg.get("trust_checkpoint", False),
                                "model.trust_checkpoint")
        load_strictly(net, state, f"model.checkpoint={str(cfg.checkpoint)!r}")
    net.eval().requires_grad_(False)
    scheduler = build_noise_scheduler(custom_scheduler_spec(cfg))
    return DiffusionModel(net, scheduler, cfg.name, image_shape=tuple(cfg.image_shape))


def custom_scheduler_spec(cfg: DictConfig) -> dict | str:
    """``model.scheduler`` of a custom model: a mapping of scheduler arguments, or a folder or JSON file path."""
    node = cfg.get("scheduler")
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if node is None:
        return {}
    return str(node)


def custom_schedule(cfg: DictConfig) -> dict | None:
    """A custom model's training schedule arguments, read and checked before the model is loaded (a bad one stops
    the job now); None for the other presets, whose schedule comes with their files."""
    if cfg.get("factory") is None:
        return None
    return scheduler_config(custom_scheduler_spec(cfg))


def training_timesteps(cfg: DictConfig) -> int:
    """T of the model's training schedule, known before the model is loaded (the presets state it)."""
    schedule = custom_schedule(cfg)
    return cfg.scheduler.num_train_timesteps if schedule is None else schedule["num_train_timesteps"]


def load_strictly(net: nn.Module, state: dict, source: str) -> None:
    """Every tensor used and every shape checked; a mismatch names the source and the tensors."""
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [f"{k} {tuple(state[k].shape)} (the network's: {tuple(own[k].shape)})" for k in sorted(own)
                if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise ValueError(f"{source} does not fit the network from model.factory: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {reshaped[:5]} "
                         f"({len(missing)}/{len(unexpected)}/{len(reshaped)} tensors)")
    net.load_state_dict(state, strict=True)


def check_model_files(cfg: DictConfig) -> None:
    """The files a model config names exist (before any job touches its folder: a typo is not found minutes
    later, when the model loads)."""
    named = {"model.checkpoint": cfg.get("checkpoint"),
             "model.conditioning.prompts_file": OmegaConf.select(cfg, "conditioning.prompts_file", default=None)}
    for key, value in named.items():
        if value and not Path(value).expanduser().is_file():
            hint = f"; download {cfg.download_url}" if key == "model.checkpoint" and cfg.get("download_url") else ""
            raise FileNotFoundError(f"{key}={value!r}: no such file{hint}")
    if cfg.get("improved_diffusion") is not None and not cfg.get("checkpoint"):
        env = f" (or the environment variable {cfg.checkpoint_env})" if cfg.get("checkpoint_env") else ""
        raise FileNotFoundError(f"model={cfg.get('name')} needs its improved-diffusion checkpoint: set "
                                f"model.checkpoint=/path/to/it{env}"
                                + (f"; download {cfg.download_url}" if cfg.get("download_url") else ""))


def model_identity(cfg: DictConfig) -> str:
    """A digest of everything of the model that shapes its samples (for caches and for skipping finished jobs):
    every file of the pipeline's components whatever its format (.safetensors, .bin, ...), the conditioning and
    a prompts file's contents; for a custom or improved-diffusion model its config and checkpoint file."""
    h = hashlib.sha1()
    if cfg.get("factory") is None and cfg.get("improved_diffusion") is None:
        folder = resolve_model_dir(cfg.pretrained)
        files = []
        for sub in ("scheduler", "unet", "vae", "vqvae", "text_encoder", "tokenizer"):  # what an image depends on
            if (folder / sub).is_dir():
                files += sorted(p for p in (folder / sub).rglob("*") if p.is_file() and not p.name.startswith("."))
        conditioning = cfg.get("conditioning")
        conditioning = {} if conditioning is None else OmegaConf.to_container(conditioning, resolve=True)
        h.update(json.dumps(conditioning, sort_keys=True).encode())
        if conditioning.get("prompts_file"):  # its lines are the prompts: key by them, not by the path
            files.append(Path(conditioning["prompts_file"]).expanduser())
    else:
        config = OmegaConf.to_container(cfg, resolve=True)
        if cfg.get("factory") is not None:  # the schedule's arguments, also those read from a file
            spec = custom_scheduler_spec(cfg)
            config["scheduler"] = given_arguments(spec) if isinstance(spec, dict) else scheduler_config(spec)
        h.update(json.dumps(config, sort_keys=True).encode())
        files = [Path(cfg.checkpoint).expanduser()] if cfg.get("checkpoint") else []
    for f in files:
        h.update(f.name.encode() + b"\0")
        if f.is_file():
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
