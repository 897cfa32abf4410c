"""Experiment loggers from the ``logger`` config group (``wandb`` offline, ``csv`` or ``none``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from ptq4dm.utils.targets import build_typed


def make_logger(cfg: DictConfig | None, **overrides):
    """The configured Lightning logger (``logger._target_`` must name a Logger subclass), or ``False``
    (Lightning's "no logger")."""
    if cfg is None or OmegaConf.select(cfg, "_target_") is None:
        return False
    return build_typed(cfg, "logger", Logger, **overrides)


def finish_logger(logger, failed: bool = False) -> None:
    """End a W&B run (marked failed if asked) so the next job of a multirun process starts its own."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        logger.experiment  # noqa: B018 - make sure the run exists before finishing it
        wandb.finish(exit_code=1 if failed else 0)
