"""A small epsilon-prediction network that is not a diffusers model: what a user brings with model=custom."""

import math

import torch
from torch import nn


class TinyEpsNet(nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(32, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000) * torch.arange(16, device=x.device) / 16)
        angles = t.float()[:, None] * freqs[None]
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = torch.nn.functional.silu(self.inp(x)) + emb[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.mid(h)))


def make_net(channels: int = 16, seed: int = 0) -> TinyEpsNet:
    torch.manual_seed(seed)
    return TinyEpsNet(channels)
