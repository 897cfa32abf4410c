"""Experiment loggers from the ``logger`` config group (``wandb`` offline, ``csv`` or ``none``)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def make_logger(cfg: DictConfig | None, **overrides):
    """Instantiate the configured Lightning logger, or return ``False`` (Lightning's "no logger")."""
    if cfg is None or OmegaConf.select(cfg, "_target_") is None:
        return False
    return instantiate(cfg, **overrides)


def finish_logger(logger, failed: bool = False) -> None:
    """End a W&B run (marked failed if asked) so the next job of a multirun process starts its own."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        logger.experiment  # noqa: B018 - make sure the run exists before finishing it
        wandb.finish(exit_code=1 if failed else 0)
