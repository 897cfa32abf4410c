"""Sampling many images through Lightning: one prediction batch per seed range, on any number of devices.

Each batch covers image indices [start, start + batch_size); its noise comes from per-image generators seeded
by (seed, index), so the images do not depend on how batches are spread over devices. Finished batches are
written as shards (atomically), which both gathers results from DDP ranks and lets an interrupted run resume.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.diffusion.sampler import to_uint8
from ptq4dm.utils.io import atomic_path
from ptq4dm.utils.precision import autocast, check_precision



class SeedBatches(Dataset):
    """Index ranges [start, start + batch_size) of images still to sample; each item is one prediction batch."""

    def __init__(self, num_samples: int, batch_size: int, skip: set[int] = frozenset()):
        starts = range(0, num_samples, batch_size)
        self.batches = [torch.arange(s, min(s + batch_size, num_samples)) for s in starts if s not in skip]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batches[i]


class SamplingModule(pl.LightningModule):
    """Samples uint8 images for batches of image indices with ``sampler`` and the epsilon network ``unet``.

    A latent model's ``decoder`` (full precision) turns the sampled latents into images; a conditional model's
    ``conditioner`` gives each image index its conditioning (see ptq4dm.models.conditioners).
    """

    def __init__(self, unet: torch.nn.Module, sampler: Sampler, seed: int = 0, precision: str = "fp32",
                 image_shape: tuple[int, int, int] | None = None, compile: bool = False,
                 decoder: torch.nn.Module | None = None, conditioner=None):
        super().__init__()
        self.unet, self.sampler, self.seed, self.precision = unet, sampler, seed, check_precision(precision)
        self.compile = compile  # sample through torch.compile(unet.forward): one graph, elementwise ops fused
        self._compiled_forward = None  # a function, not a module: stays out of the state dict
        self.output_quantizer = None  # quantizes the sampler's own outputs (PTQ4DM Table 1), if set
        self.decoder, self.conditioner = decoder, conditioner
        config = getattr(unet, "config", None)
        self.image_shape = image_shape or (config.in_channels, config.sample_size, config.sample_size)

    def autocast(self, device: torch.device) -> torch.autocast:
        """The network's compute precision: ``precision`` on CUDA, float32 elsewhere."""
        return autocast(self.precision, device)

    def network(self):
        """What sampling calls: the network, or its compiled forward (compiled on first use)."""
        if not self.compile:
            return self.unet
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.unet.forward)
        return self._compiled_forward

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast(x.device):
            t = t.expand(x.shape[0])
            out = self.network()(x, t) if cond is None else self.network()(x, t, cond)
        return (out.sample if hasattr(out, "sample") else out).float()

    def predict_step(self, indices: torch.Tensor, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        indices = indices.cpu()
        generators = seeded_generators(self.seed, indices.tolist())
        noise = self.sampler.initial_noise(generators, self.image_shape, self.device)
        conditioning = None if self.conditioner is None else self.conditioner(indices)
        try:
            x = self.sampler.sample(self.denoise, noise, generators, output_quantizer=self.output_quantizer,
                                    conditioning=conditioning, clip=self.decoder is None)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}, sampling images {int(indices[0])}..{int(indices[-1])}") from err
        if self.decoder is not None:  # latents -> images, in full precision
            x = self.decoder(x)
        return {"indices": indices, "images": to_uint8(x).cpu()}


class ShardWriter(BasePredictionWriter):
    """Writes each finished batch to ``folder/shard-<first index>.pt``."""

    def __init__(self, folder: str | Path):
        super().__init__(write_interval="batch")
        self.folder = Path(folder)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        first = int(prediction["indices"][0])
        with atomic_path(self.folder / f"shard-{first:08d}.pt") as tmp:
            torch.save(prediction, tmp)


class SeedDataModule(pl.LightningDataModule):
    """Prediction batches of image indices; batches already written to ``shard_dir`` are left out."""

    def __init__(self, num_samples: int, batch_size: int, shard_dir: str | Path):
        super().__init__()
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"eval.num_samples={num_samples} and eval.batch_size={batch_size} must be 1 or more")
        self.num_samples, self.batch_size, self.shard_dir = num_samples, batch_size, Path(shard_dir)

    def todo(self) -> SeedBatches:
        return SeedBatches(self.num_samples, self.batch_size, skip=set(done_shards(self.shard_dir)))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.todo(), batch_size=None)


def done_shards(folder: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in folder.glob("shard-*.pt")} if folder.is_dir() else {}


def load_shards(folder: Path, num_samples: int) -> torch.Tensor:
    """The images of all shards in index order; checks that they are exactly 0..num_samples-1."""
    shards = [torch.load(p, weights_only=True) for _, p in sorted(done_shards(folder).items())]
    if not shards:
        raise RuntimeError(f"no samples in {folder}")
    indices = torch.cat([s["indices"] for s in shards])
    images = torch.cat([s["images"] for s in shards])
    order = torch.argsort(indices)
    if not torch.equal(indices[order], torch.arange(num_samples)):
        raise RuntimeError(f"samples in {folder} do not cover 0..{num_samples - 1} ({len(indices)} found); "
                           "delete the folder if the settings changed")
    return images[order]


def generate_images(module: SamplingModule, num_samples: int, batch_size: int = 256,
                    shard_dir: str | Path = "samples", trainer_kwargs: dict | None = None) -> torch.Tensor | None:
    """Sample ``num_samples`` images with ``module``; uint8 (N, 3, H, W) on global rank 0, None elsewhere.

    Batches already in ``shard_dir`` (from an interrupted run with the same settings) are not sampled again.
    """
    data = SeedDataModule(num_samples, batch_size, shard_dir)
    if len(data.todo()):
        kwargs = {"logger": False, "enable_model_summary": False, **(trainer_kwargs or {})}
        trainer = pl.Trainer(callbacks=[ShardWriter(shard_dir)], **kwargs)
        trainer.predict(module, datamodule=data, return_predictions=False)
        trainer.strategy.barrier()  # every rank's shards are on disk before rank 0 reads them
        if trainer.global_rank != 0:
            return None
    return load_shards(Path(shard_dir), num_samples)
