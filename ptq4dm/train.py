"""Train a diffusion UNet with the DDPM objective: ``python -m ptq4dm.train model=small_cifar10``.

Resumes from ``train.ckpt_dir/last.ckpt`` when present (images seen, wall time and the time budget carry
over), and exports the EMA weights as a diffusers pipeline folder at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ptq4dm.models import (
    DiffusionModel,
    build_noise_scheduler,
    build_unet,
    load_diffusion_model,
    save_diffusion_model,
)
from ptq4dm.training import DeviceResidentImages, DiffusionTraining
from ptq4dm.training.module import check_trainable
from ptq4dm.utils.checkpoints import load_checkpoint
from ptq4dm.utils.config import save_resolved_config
from ptq4dm.utils.loggers import finish_logger, make_logger

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True
    out = Path(cfg.output_dir)
    save_resolved_config(cfg, out)

    scheduler = build_noise_scheduler(OmegaConf.to_container(cfg.model.scheduler, resolve=True), "model.scheduler")
    check_trainable(scheduler)  # before the data set is loaded
    data = DeviceResidentImages(**cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed)
    unet = build_unet(**cfg.model.unet)
    prior = {}
    if cfg.train.init_from:  # warm start from exported weights; counters continue from their training.json
        unet.load_state_dict(load_diffusion_model(cfg.train.init_from).unet.float().state_dict())
        summary_file = Path(cfg.train.init_from) / "training.json"
        prior = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    compile_ = torch.cuda.is_available() if cfg.train.compile is None else bool(cfg.train.compile)
    module = DiffusionTraining(unet, scheduler, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                               warmup_steps=cfg.train.warmup_steps, ema_decay=cfg.train.ema_decay,
                               hflip=cfg.train.hflip, compile=compile_,
                               print_every=cfg.train.print_every)
    module.images_seen.fill_(prior.get("images_seen", 0))
    module.train_seconds.fill_(prior.get("train_seconds", 0.0))
    log.info("model %s: %.2fM parameters", cfg.model.name, sum(p.numel() for p in unet.parameters()) / 1e6)

    ckpt_dir = Path(cfg.train.ckpt_dir)
    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                                 every_n_train_steps=cfg.train.ckpt_every_n_steps)
    logger = make_logger(cfg.logger)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer), logger=logger, callbacks=[checkpointing],
                         enable_checkpointing=True)
    resume = ckpt_dir / "last.ckpt"
    if resume.exists():
        load_checkpoint(resume, trusted=cfg.train.trust_checkpoint, trust_key="train.trust_checkpoint")  # vet it
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume.exists() else None,
                weights_only=not cfg.train.trust_checkpoint)
    trainer.save_checkpoint(resume)

    summary = {
        "model": cfg.model.name,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "images_seen": int(module.images_seen),
        "train_seconds": round(float(module.train_seconds), 1),
        "steps": trainer.global_step,
        "batch_size": cfg.train.batch_size,
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    ema = DiffusionModel(unet=module.ema.float().cpu(), scheduler=scheduler, name=cfg.model.name)
    save_diffusion_model(ema, cfg.train.export_dir, dtype=torch.float16, extra=summary)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("trained %s", json.dumps(summary))
    finish_logger(logger)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
