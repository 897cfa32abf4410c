"""Full-precision samples, their Inception features and scores, cached on disk and shared by every job of a
sweep with the same model weights, sampler, seeds, sample count, batch size and autocast precision."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ptq4dm.models.unet import resolve_model_dir
from ptq4dm.utils.io import default_cache_dir


def _weights_digest(model_dir: Path) -> str:
    h = hashlib.sha1()
    for f in sorted((model_dir / "unet").glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def fp_cache_dir(cfg: DictConfig) -> Path:
    model_dir = resolve_model_dir(cfg.model.pretrained)
    ident = {"weights": _weights_digest(model_dir), "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
             "seed": cfg.seed, "num_samples": cfg.eval.num_samples, "batch_size": cfg.eval.batch_size,
             "precision": cfg.eval.precision}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.fp_cache_dir) if cfg.get("fp_cache_dir") else default_cache_dir() / "fp_samples"
    name = f"{cfg.model.name}-{cfg.sampler.name}{cfg.sampler.steps}-n{cfg.eval.num_samples}-seed{cfg.seed}-{key}"
    return root / name
