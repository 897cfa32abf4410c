"""Image grids for figures and W&B."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """uint8 (N, 3, H, W) or (N, 1, H, W) images as one RGB PIL image, about square (grayscale as gray RGB)."""
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow).save(path)
    return path
