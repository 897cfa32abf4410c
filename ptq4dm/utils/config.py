"""Where the Hydra configs live, and saving the resolved config next to results."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ptq4dm.experiment import schema
from ptq4dm.utils.io import atomic_write_text

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
schema.register()  # conf/run.yaml and conf/evaluate.yaml start from these structured configs


def save_resolved_config(cfg: DictConfig, folder: str | Path, name: str = "config.yaml") -> Path:
    path = Path(folder) / name
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path
