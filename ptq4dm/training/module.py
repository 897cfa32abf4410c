"""The DDPM objective (epsilon prediction) with EMA weights, as a LightningModule."""

from __future__ import annotations

import copy
import logging
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

log = logging.getLogger(__name__)


def check_trainable(noise_scheduler: DDPMScheduler) -> None:
    """Training fits epsilon prediction only (sampling and quantization take v_prediction and sample too)."""
    kind = noise_scheduler.config.prediction_type
    if kind != "epsilon":
        raise ValueError(f"model.scheduler.prediction_type={kind!r}: training (ptq4dm.train) fits the noise; allowed "
                         "is 'epsilon' (v_prediction and sample networks can be sampled and quantized, not trained here)")


class DiffusionTraining(pl.LightningModule):
    """Trains ``unet`` to predict the noise added by ``noise_scheduler``; keeps an EMA copy for sampling.

    Batches are uint8 images (B, 3, H, W) already on the device; flips and scaling to [-1, 1] happen here.
    """

    def __init__(self, unet: UNet2DModel, noise_scheduler: DDPMScheduler, lr: float = 2e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 1000, ema_decay: float = 0.9995,
                 hflip: bool = True, compile: bool = False, print_every: int = 1000):
        super().__init__()
        check_trainable(noise_scheduler)
        self.save_hyperparameters(ignore=["unet", "noise_scheduler"])
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.register_buffer("alphas_cumprod", noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        # Counters that survive checkpoints and resumes: what the README reports for each model.
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))
        self._compiled = False
        self._t0 = None

    def on_fit_start(self) -> None:
        if self.hparams.compile and not self._compiled:
            self.unet.compile()  # in place: parameter names and checkpoints stay those of the plain model
            self._compiled = True
        self._t0, self._seen0, self._seconds0 = time.perf_counter(), int(self.images_seen), float(self.train_seconds)

    def diffusion_loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = images.float() / 127.5 - 1.0
        if self.hparams.hflip:
            flip = torch.rand(x0.shape[0], device=x0.device, generator=generator) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        T = self.alphas_cumprod.shape[0]
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
            eps = self.unet(x_t, t).sample
        return F.mse_loss(eps.float(), noise)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(images)
        self.images_seen += images.shape[0]
        elapsed = time.perf_counter() - self._t0
        self.train_seconds.fill_(self._seconds0 + elapsed)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/images_seen", self.images_seen.float(), prog_bar=False)
        if self.global_step % 50 == 0:
            rate = (int(self.images_seen) - self._seen0) / max(elapsed, 1e-9)
            self.log("train/images_per_sec", rate, prog_bar=True)
            if self.global_step % self.hparams.print_every == 0:  # a plain line for logs without a progress bar
                log.info("step %d images %d loss %.4f %.0f img/s train time %.0f s", self.global_step,
                         int(self.images_seen), float(loss.detach()), rate, float(self.train_seconds))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        # Warm-up as in diffusers' EMAModel: a young model is averaged over fewer steps.
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        ema, live = list(self.ema.parameters()), list(self.unet.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - decay)

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                fused=fused)
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
