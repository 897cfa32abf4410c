"""A network shaped like a third party's MNIST DDPM (issue 16): one channel, 28x28, a time step looked up in an
nn.Embedding table (an integer time embedding), strided-conv downsampling and ConvTranspose2d upsampling with a
skip connection. Random weights: it stands in for the trained one in tests of ``model=custom``."""

import torch
from torch import nn
from torch.nn.functional import silu


class MnistLikeNet(nn.Module):
    def __init__(self, num_train_timesteps: int = 1000, channels: int = 8, time_dim: int = 16):
        super().__init__()
        self.time = nn.Embedding(num_train_timesteps, time_dim)  # integer t -> its own learned vector
        self.time_proj = nn.Linear(time_dim, 2 * channels)
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1)  # 28 -> 14
        self.mid = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1)  # 14 -> 28
        self.out = nn.Conv2d(2 * channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.long().expand(x.shape[0]) if t.ndim == 0 else t.long()
        emb = self.time_proj(silu(self.time(t)))[:, :, None, None]
        h0 = silu(self.inp(x))
        h = silu(self.mid(silu(self.down(h0)) + emb))
        return self.out(torch.cat([silu(self.up(h)), h0], dim=1))


def make_net(num_train_timesteps: int = 1000, channels: int = 8, seed: int = 0) -> MnistLikeNet:
    torch.manual_seed(seed)
    return MnistLikeNet(num_train_timesteps, channels)
