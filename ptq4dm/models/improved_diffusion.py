"""openai/improved-diffusion checkpoints (Nichol & Dhariwal 2021) as diffusers UNet2DModels, loaded strictly.

PTQ4DM quantizes improved-diffusion's unconditional CIFAR-10 and ImageNet-64 models. Their ``UNetModel`` maps
block for block onto diffusers' ``UNet2DModel`` (scale-shift ResBlocks, [cos, sin] timestep embedding, GroupNorm
with 32 groups and eps 1e-5, stride-2 conv downsampling, nearest + conv upsampling). Two things do not fit a
plain UNet2DModel config, so ``ImprovedDiffusionUNet2DModel`` sets them after building the blocks:

- every attention block has ``num_heads`` heads whatever its width (UNet2DModel fixes the head *width*, and
  ImageNet-64 attends at 384 and 512 channels: 4 heads of 96 and of 128);
- with ``rescale_timesteps=True`` (the default of improved-diffusion's scripts, which both checkpoints keep) the
  network is fed t * 1000 / diffusion_steps, not t.

Every checkpoint tensor is used and every shape is checked; a mismatch names the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import Timesteps

from ptq4dm.diffusion.improved_ddpm import ImprovedDDPMScheduler
from ptq4dm.models.unet import DiffusionModel
from ptq4dm.utils.checkpoints import read_state_dict as read_checkpoint

# improved-diffusion's script_util.create_model picks the channel multipliers from the image size.
CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}

# Top-level modules of improved-diffusion's UNetModel: how its state dicts are recognised.
TOP_LEVEL_MODULES = ("time_embed", "input_blocks", "middle_block", "output_blocks", "out")

# ResBlock submodule -> diffusers ResnetBlock2D submodule (in_layers/out_layers are [GroupNorm, SiLU, (Dropout), Conv]).
RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


class ImprovedDiffusionUNet2DModel(UNet2DModel):
    """improved-diffusion's ``UNetModel``, built from its command-line flags, as a diffusers UNet2DModel.

    The config holds the flags (and, as for any UNet2DModel, the derived UNet2DModel arguments), so
    ``ImprovedDiffusionUNet2DModel.from_config(unet.config)`` rebuilds the same network. ``channel_mult=None``
    picks improved-diffusion's multipliers for ``image_size``; ``attention_resolutions`` are in pixels, as the
    ``--attention_resolutions 16,8`` flag.
    """

    @register_to_config
    def __init__(self, image_size: int = 32, num_channels: int = 128, num_res_blocks: int = 3,
                 channel_mult: tuple[int, ...] | None = None, attention_resolutions: tuple[int, ...] = (16, 8),
                 num_heads: int = 4, num_heads_upsample: int = -1, learn_sigma: bool = True,
                 use_scale_shift_norm: bool = True, dropout: float = 0.0, diffusion_steps: int = 4000,
                 rescale_timesteps: bool = True):
        mult = tuple(channel_mult) if channel_mult else _channel_mult(image_size)
        attention_ds = {image_size // int(r) for r in attention_resolutions}
        has_attention = [2**level in attention_ds for level in range(len(mult))]  # ds = 2**level in UNetModel
        widths = [num_channels * m for m in mult]
        attention_widths = [w for w, a in zip(widths, has_attention) if a] + [widths[-1]]  # + the middle block
        super().__init__(
            sample_size=image_size,
            in_channels=3,
            out_channels=6 if learn_sigma else 3,  # learned sigma: [eps, v], v in [-1, 1] interpolates log-variances
            block_out_channels=tuple(widths),
            layers_per_block=num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
            time_embedding_type="positional",
            flip_sin_to_cos=True,  # improved-diffusion's embedding is [cos, sin] ...
            freq_shift=0,  # ... with frequencies exp(-ln(10000) * i / half)
            downsample_padding=1,  # Downsample: Conv2d(3, stride 2, padding 1)
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=32,  # nn.GroupNorm(32, C), eps 1e-5
            attn_norm_num_groups=32,  # the middle attention normalises too (UNet2DModel drops it with scale_shift)
            norm_eps=1e-5,
            resnet_time_scale_shift="scale_shift" if use_scale_shift_norm else "default",
            attention_head_dim=math.gcd(*attention_widths),  # divides every width; the head count is set below
            dropout=dropout,
        )
        up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                _set_num_heads(module, up_heads if name.startswith("up_blocks.") else num_heads)
        # The network sees t * 1000 / T with rescale_timesteps (float time steps, as improved-diffusion feeds them).
        self.time_proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0,
                                   scale=1000.0 / diffusion_steps if rescale_timesteps else 1.0)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # The config also records the UNet2DModel arguments derived from the flags; they are not arguments here.
        derived = UNet2DModel._get_init_keys(UNet2DModel) - cls._get_init_keys(cls)
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k not in derived}, **kwargs)


def _channel_mult(image_size: int) -> tuple[int, ...]:
    if image_size not in CHANNEL_MULT:
        raise ValueError(f"improved-diffusion has no channel_mult for image_size={image_size} "
                         f"(it has {sorted(CHANNEL_MULT)}): pass channel_mult")
    return CHANNEL_MULT[image_size]


def _set_num_heads(attn: Attention, heads: int) -> None:
    """Split ``attn`` into ``heads`` heads of width C / heads (its Linear layers do not depend on the split)."""
    if attn.inner_dim % heads:
        raise ValueError(f"{attn.inner_dim} attention channels do not split into {heads} heads")
    attn.heads = attn.sliceable_head_dim = heads
    attn.scale = (attn.inner_dim // heads) ** -0.5


# ----------------------------------------------------------------------------------------------------------------
# State dict conversion


@dataclass(frozen=True)
class _Rule:
    """How one checkpoint tensor of a given shape becomes diffusers tensors."""

    shape: tuple[int, ...]
    convert: Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _copy(key: str, shape: torch.Size) -> _Rule:
    return _Rule(tuple(shape), lambda t: {key: t})


def _conv1d_as_linear(key: str, shape: torch.Size) -> _Rule:
    # proj_out is Conv1d(C, C, 1): a Linear with a trailing kernel dimension of 1.
    return _Rule((*shape, 1), lambda t: {key: t[..., 0]})


def _qkv(prefix: str, heads: int, channels: int, param: str) -> _Rule:
    """qkv is Conv1d(C, 3C, 1). UNetModel reshapes its output to (B * heads, 3C / heads, T) and splits each head's
    block into q, k, v: channel order (head, q|k|v, d), d = C / heads. diffusers' to_q/to_k/to_v are (head, d)."""
    d = channels // heads
    shape = (3 * channels, channels, 1) if param == "weight" else (3 * channels,)

    def convert(t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t[..., 0] if param == "weight" else t  # drop the kernel dimension
        per_head = t.reshape(heads, 3, d, *t.shape[1:])
        return {f"{prefix}.to_{name}.{param}": per_head[:, i].reshape(channels, *t.shape[1:])
                for i, name in enumerate("qkv")}

    return _Rule(shape, convert)


def _block_pairs(unet: UNet2DModel) -> list[tuple[str, str, str]]:
    """(improved-diffusion module, diffusers module, kind) for every block, in UNetModel's numbering.

    ``input_blocks`` are [conv_in], then per level ``num_res_blocks`` x [ResBlock(, Attention)] and a
    [Downsample] except at the last level; ``output_blocks`` are per level, deepest first,
    ``num_res_blocks + 1`` x [ResBlock(, Attention)(, Upsample on the last one, except at level 0)].
    """
    pairs = [("time_embed.0", "time_embedding.linear_1", "module"),
             ("time_embed.2", "time_embedding.linear_2", "module"),
             ("input_blocks.0.0", "conv_in", "module"),
             ("out.0", "conv_norm_out", "module"),
             ("out.2", "conv_out", "module")]
    k = 1
    for level, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}", "resblock"))
            if hasattr(block, "attentions"):
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}", "attention"))
            k += 1
        if block.downsamplers is not None:
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "module"))
            k += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", "resblock"),
              ("middle_block.1", "mid_block.attentions.0", "attention"),
              ("middle_block.2", "mid_block.resnets.1", "resblock")]
    k = 0
    for level, block in enumerate(unet.up_blocks):
        for i in range(len(block.resnets)):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{level}.resnets.{i}", "resblock"))
            n = 1
            if hasattr(block, "attentions"):
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{level}.attentions.{i}", "attention"))
                n = 2
            if block.upsamplers is not None and i == len(block.resnets) - 1:
                pairs.append((f"output_blocks.{k}.{n}.conv", f"up_blocks.{level}.upsamplers.0.conv", "module"))
            k += 1
    return pairs


def conversion_rules(unet: UNet2DModel) -> dict[str, _Rule]:
    """Every tensor an improved-diffusion checkpoint of ``unet``'s architecture holds, and where it goes."""
    target = {k: v.shape for k, v in unet.state_dict().items()}
    rules: dict[str, _Rule] = {}
    for src, dst, kind in _block_pairs(unet):
        if kind == "attention":
            attn = unet.get_submodule(dst)
            for p in ("weight", "bias"):
                rules[f"{src}.qkv.{p}"] = _qkv(dst, attn.heads, attn.inner_dim, p)
            rules[f"{src}.proj_out.weight"] = _conv1d_as_linear(f"{dst}.to_out.0.weight",
                                                                target[f"{dst}.to_out.0.weight"])
            rules[f"{src}.proj_out.bias"] = _copy(f"{dst}.to_out.0.bias", target[f"{dst}.to_out.0.bias"])
            subs = {"norm": "group_norm"}
        else:
            subs = RESBLOCK if kind == "resblock" else {"": ""}
        for s, d in subs.items():
            for p in ("weight", "bias"):
                src_key, dst_key = ".".join(filter(None, (src, s, p))), ".".join(filter(None, (dst, d, p)))
                if dst_key in target:  # e.g. skip_connection exists only where a ResBlock changes width
                    rules[src_key] = _copy(dst_key, target[dst_key])
    return rules


def check_is_improved_diffusion(state, source: str = "the checkpoint") -> None:
    """A clear error for anything that is not an improved-diffusion UNetModel state dict."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ + (f" with keys {sorted(state)[:5]}" if isinstance(state, Mapping) else "")
        raise ValueError(f"{source} is not an improved-diffusion checkpoint: expected a state dict of tensors "
                         f"(improved-diffusion saves torch.save(model.state_dict())), got a {found}")
    if not any(str(k).split(".")[0] in TOP_LEVEL_MODULES for k in state):
        raise ValueError(f"{source} is not an improved-diffusion UNetModel state dict: its keys look like "
                         f"{sorted(state)[:5]}, not input_blocks.0.0.weight, time_embed.0.weight, ...")


def convert_state_dict(state: Mapping[str, torch.Tensor], unet: UNet2DModel,
                       source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The diffusers state dict of ``unet`` from an improved-diffusion one; every tensor used, every shape checked."""
    check_is_improved_diffusion(state, source)
    rules = conversion_rules(unet)
    missing, unexpected = sorted(set(rules) - set(state)), sorted(set(state) - set(rules))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this improved-diffusion architecture ({_describe(unet)}): "
                         f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:8]}")
    converted: dict[str, torch.Tensor] = {}
    for key, rule in rules.items():
        if tuple(state[key].shape) != rule.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, this improved-diffusion "
                             f"architecture ({_describe(unet)}) needs {rule.shape}")
        converted.update(rule.convert(state[key]))
    return converted


def _describe(unet: UNet2DModel) -> str:
    keys = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
            "learn_sigma")
    return ", ".join(f"{k}={unet.config[k]}" for k in keys if k in unet.config)


def load_state_dict_strict(unet: UNet2DModel, state: Mapping[str, torch.Tensor], source: str = "the checkpoint"):
    converted = convert_state_dict(state, unet, source)
    unet.load_state_dict(converted, strict=True)  # and every diffusers tensor is filled
    return unet


# ----------------------------------------------------------------------------------------------------------------
# Loading a model


def read_state_dict(path: str | Path, trusted: bool = False) -> Mapping[str, torch.Tensor]:
    """A .pt file (read with weights_only=True) or a .safetensors file; a clear error for anything else."""
    return read_checkpoint(path, "model.checkpoint", trusted, "model.trust_checkpoint")


def build_scheduler(**config) -> ImprovedDDPMScheduler:
    """The training noise schedule, stepped as improved-diffusion steps (float64 constants, its clipped posterior
    log-variance at the first step); clip_sample as its clip_denoised=True."""
    scheduler = ImprovedDDPMScheduler(**{"clip_sample": True, **config})
    scheduler.alphas_cumprod_f64  # checks the config now rather than at the first step
    return scheduler


def load_improved_diffusion_model(checkpoint: str | Path | None, unet: Mapping, scheduler: Mapping,
                                  name: str = "improved_diffusion", download_url: str | None = None,
                                  checkpoint_env: str | None = None, trusted: bool = False) -> DiffusionModel:
    """An improved-diffusion checkpoint as a DiffusionModel: ``unet`` holds ImprovedDiffusionUNet2DModel's flags,
    ``scheduler`` the DDPMScheduler arguments of its training schedule (an ImprovedDDPMScheduler is built)."""
    hint = (f"download {download_url} and set model.checkpoint=/path/to/{download_url.rsplit('/', 1)[-1]}"
            if download_url else "set model.checkpoint=/path/to/the/checkpoint.pt")
    if checkpoint_env:
        hint += f" (or the environment variable {checkpoint_env})"
    if not checkpoint:
        raise FileNotFoundError(f"model={name} needs its improved-diffusion checkpoint: {hint}")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint={str(path)!r} does not exist: {hint}")
    net = ImprovedDiffusionUNet2DModel(**unet)
    load_state_dict_strict(net, read_state_dict(path, trusted), source=str(path))
    net.eval().requires_grad_(False)
    return DiffusionModel(net, build_scheduler(**scheduler), name)
