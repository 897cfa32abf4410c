"""Training data that lives on the accelerator: the whole set as one uint8 tensor, batches gathered by index.

A DataLoader of index batches costs nothing to iterate; the gather and the float conversion happen on the
device, so a small UNet is never starved by host-side decoding or copies.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from ptq4dm.data import load_cifar10


class _IndexBatches(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


class DeviceResidentImages(pl.LightningDataModule):
    def __init__(self, root: str, format: str = "auto", split: str = "train", batch_size: int = 128,
                 limit: int | None = None, seed: int = 0, cache_dir: str | None = None, **_ignored):
        super().__init__()
        self.root, self.format, self.split, self.limit = root, format, split, limit
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self.images: torch.Tensor | None = None
        self._on_device: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            self.images = load_cifar10(self.root, self.split, self.format, self.cache_dir, self.limit).images

    def train_dataloader(self) -> DataLoader:
        n = len(self.images)
        if n < self.batch_size:
            raise ValueError(f"train.batch_size={self.batch_size} exceeds the {n} training images")
        sampler = BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(self.seed)),
                               self.batch_size, drop_last=True)
        return DataLoader(_IndexBatches(n), sampler=sampler, batch_size=None)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        if self._on_device is None or self._on_device.device != batch.device:
            self._on_device = self.images.to(batch.device)
        return self._on_device[batch]
