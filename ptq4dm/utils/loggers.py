"""Experiment loggers from the ``logger`` config group (``wandb`` offline, ``csv`` or ``none``)."""

from __future__ import annotations

import inspect

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from ptq4dm.utils.targets import build_typed, resolve_typed


def make_logger(cfg: DictConfig | None, **overrides):
    """The configured Lightning logger (``logger._target_`` must name a Logger subclass), or ``False``
    (Lightning's "no logger")."""
    if cfg is None or OmegaConf.select(cfg, "_target_") is None:
        return False
    return build_typed(cfg, "logger", Logger, **overrides)


def check_logger(cfg: DictConfig | None) -> None:
    """The logger config, checked before a job does any work (the logger itself is made at the end): its class,
    and that its constructor takes the given keys (W&B's extra keys go to ``wandb.init``, so they must be its)."""
    if cfg is None or OmegaConf.select(cfg, "_target_") is None:
        return
    cls, spec = resolve_typed(cfg, "logger", Logger)
    params = inspect.signature(cls).parameters
    named = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        if cls.__name__ != "WandbLogger":
            return  # another logger passing keys on: its own checks decide
        import wandb

        named |= set(inspect.signature(wandb.init).parameters)
    extra = sorted(set(spec) - named)
    if extra:
        raise ValueError(f"logger: {[f'logger.{k}' for k in extra]} are not arguments of {cls.__name__}: allowed "
                         f"are {sorted(named)}")


def finish_logger(logger, failed: bool = False) -> None:
    """End a W&B run (marked failed if asked) so the next job of a multirun process starts its own."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        logger.experiment  # noqa: B018 - make sure the run exists before finishing it
        wandb.finish(exit_code=1 if failed else 0)
