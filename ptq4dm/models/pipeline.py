"""Latent and conditional diffusers pipelines (LDM, Stable Diffusion, class-conditional UNets) from a folder.

The folder is a diffusers pipeline: ``unet/`` (a UNet2DModel or UNet2DConditionModel), ``scheduler/``, and, for
a latent model, ``vae/`` (AutoencoderKL) or ``vqvae/`` (VQModel); a text-conditional one adds ``text_encoder/``
and ``tokenizer/`` (transformers). Only the UNet is ever quantized: the autoencoder and the text encoder are
loaded in full precision and used as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from torch import nn

from ptq4dm.models.conditioners import KINDS, ClassLabels, TextPrompts, clip_text_encoder, read_prompts
from ptq4dm.models.unet import (
    DiffusionModel,
    check_loading_info,
    load_component_strictly,
    load_noise_scheduler,
    resolve_model_dir,
)

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
AUTOENCODERS = {"vae": ("AutoencoderKL",), "vqvae": ("VQModel",)}


class LatentDecoder(nn.Module):
    """Latents -> images in [-1, 1] through the pipeline's autoencoder, ``batch_size`` latents at a time."""

    def __init__(self, autoencoder: nn.Module, batch_size: int = 32):
        super().__init__()
        self.autoencoder, self.batch_size = autoencoder, batch_size
        self.scaling_factor = float(getattr(autoencoder.config, "scaling_factor", None) or 1.0)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        parts = [self.autoencoder.decode(z / self.scaling_factor).sample
                 for z in latents.split(self.batch_size)]
        return torch.cat(parts).float().clamp(-1, 1)


def _component_class(folder: Path, allowed: tuple[str, ...]) -> type:
    config = json.loads((folder / "config.json").read_text())
    name = config.get("_class_name")
    if name not in allowed:
        raise ValueError(f"{folder}/config.json is a {name!r}; allowed here: {list(allowed)}")
    return getattr(diffusers, name)


def load_pipeline_model(pretrained: str | Path, conditioning: dict | None = None, name: str | None = None,
                        decode_batch_size: int = 32) -> DiffusionModel:
    """A pipeline folder (or a hub id in the local cache) as a DiffusionModel with decoder and conditioner.

    ``conditioning`` (``model.conditioning``) says how images are conditioned: kind none, class (labels,
    num_classes, null_label) or text (prompts or prompts_file, negative_prompt), and guidance_scale.
    """
    folder = resolve_model_dir(pretrained)
    unet = load_component_strictly(_component_class(folder / "unet", UNET_CLASSES), folder / "unet")
    decoder = None
    for sub, classes in AUTOENCODERS.items():
        if (folder / sub / "config.json").is_file():
            autoencoder = load_component_strictly(_component_class(folder / sub, classes), folder / sub)
            decoder = LatentDecoder(autoencoder, decode_batch_size)
            break
    conditioner = make_conditioner(folder, dict(conditioning or {}), unet)
    return DiffusionModel(unet, load_noise_scheduler(folder), name or folder.name, decoder=decoder,
                          conditioner=conditioner)


def make_conditioner(folder: Path, cfg: dict, unet: nn.Module):
    """The conditioner ``model.conditioning`` describes, checked against what the UNet takes."""
    kind = cfg.get("kind", "none")
    if kind not in KINDS:
        raise ValueError(f"model.conditioning.kind={kind!r}: allowed are {list(KINDS)}")
    takes_text = getattr(unet.config, "cross_attention_dim", None) is not None
    takes_class = getattr(unet.config, "num_class_embeds", None) is not None
    guidance = float(cfg.get("guidance_scale", 1.0))
    if kind == "none":
        if takes_text:
            raise ValueError(f"{folder.name}'s UNet is text-conditional (cross-attention): set "
                             "model.conditioning.kind=text")
        return None
    if kind == "class":
        if not takes_class:
            raise ValueError(f"model.conditioning.kind=class, but {folder.name}'s UNet has no class embedding "
                             "(num_class_embeds)")
        return ClassLabels(int(cfg.get("num_classes") or unet.config.num_class_embeds), cfg.get("labels"),
                           cfg.get("null_label"), guidance)
    if not takes_text:
        raise ValueError(f"model.conditioning.kind=text, but {folder.name}'s UNet takes no text (no cross-attention)")
    prompts = read_prompts(cfg["prompts_file"]) if cfg.get("prompts_file") else list(cfg.get("prompts") or [])
    return TextPrompts(load_text_encoder(folder), prompts, cfg.get("negative_prompt", ""), guidance)


def load_text_encoder(folder: Path):
    """``encode(prompts)`` from the folder's text_encoder/ and tokenizer/ (transformers), in full precision."""
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise FileNotFoundError(f"{folder} has no text_encoder/ and tokenizer/: a text-conditional pipeline needs both")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("text-conditional models need transformers: pip install 'ptq4dm[text]'") from err
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    enc_name = index.get("text_encoder", [None, "CLIPTextModel"])[1]
    tok_name = index.get("tokenizer", [None, "CLIPTokenizer"])[1]
    encoder, info = getattr(transformers, enc_name).from_pretrained(folder / "text_encoder", local_files_only=True,
                                                                    output_loading_info=True)
    check_loading_info(info, folder / "text_encoder", enc_name)
    tokenizer = getattr(transformers, tok_name).from_pretrained(folder / "tokenizer", local_files_only=True)
    return clip_text_encoder(encoder.eval().requires_grad_(False), tokenizer)
