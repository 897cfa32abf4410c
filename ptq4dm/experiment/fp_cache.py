"""Full-precision samples, their Inception features and scores, cached on disk and shared by every job of a
sweep with the same model, sampler, seeds, sample count, batch size, precision, device kind, metric settings
and data settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptq4dm.models.factory import model_identity
from ptq4dm.utils.io import default_cache_dir


def fp_cache_dir(cfg: DictConfig) -> Path:
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    ident = {"model": model_identity(cfg.model), "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
             "seed": cfg.seed, "num_samples": cfg.eval.num_samples, "batch_size": cfg.eval.batch_size,
             "precision": cfg.eval.precision if gpu else "fp32", "device": "cuda" if gpu else "cpu",
             "compile": bool(cfg.eval.get("compile", False)),
             # the cached features and scores depend on these too
             "metrics": OmegaConf.to_container(cfg.metrics, resolve=True),
             "data": OmegaConf.to_container(cfg.data, resolve=True)}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.fp_cache_dir) if cfg.get("fp_cache_dir") else default_cache_dir() / "fp_samples"
    name = f"{cfg.model.name}-{cfg.sampler.name}{cfg.sampler.steps}-n{cfg.eval.num_samples}-seed{cfg.seed}-{key}"
    return root / name
