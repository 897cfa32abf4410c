"""Where a conditional model's per-image conditioning comes from in a job: class labels or text prompts.

A conditioner maps image indices to a ``Conditioning`` (one row per image). Image i always gets the same label
or prompt (entry i modulo the list), so full-precision and quantized images pair up whatever the batch split,
and calibration sample i is conditioned the way image i is. Text is encoded once, in full precision, on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ptq4dm.diffusion.conditioning import Conditioning

Conditioner = Callable[[Sequence[int] | torch.Tensor], Conditioning]
KINDS = ("none", "class", "text")


class ClassLabels:
    """Class labels for a class-conditional UNet (``num_class_embeds``): ``labels`` cycled over the images, or
    0, 1, ..., num_classes - 1 cycled; ``null_label`` is the unconditional label classifier-free guidance needs."""

    def __init__(self, num_classes: int, labels: Sequence[int] | None = None, null_label: int | None = None,
                 guidance_scale: float = 1.0):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"model.conditioning.num_classes={num_classes!r}: allowed is a whole number >= 1")
        labels = list(range(num_classes)) if labels is None else [int(c) for c in labels]
        if not labels or any(not 0 <= c < num_classes for c in labels):
            raise ValueError(f"model.conditioning.labels={labels}: allowed are labels in [0, {num_classes})")
        self.labels = torch.tensor(labels)
        self.uncond = None if null_label is None else torch.tensor(int(null_label))
        self.guidance_scale = guidance_scale

    def __call__(self, indices) -> Conditioning:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Conditioning(self.labels[idx % len(self.labels)], self.uncond, self.guidance_scale)


class TextPrompts:
    """Prompt embeddings (``encode(list of prompts) -> (P, L, D)``) cycled over the images; under guidance the
    negative prompt's embedding is the unconditional input."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], prompts: Sequence[str],
                 negative_prompt: str = "", guidance_scale: float = 7.5):
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("model.conditioning.prompts is empty: allowed is at least one prompt (or a prompts_file)")
        self.prompts = prompts
        with torch.no_grad():
            self.embeddings = encode(prompts).float()
            self.uncond = encode([negative_prompt]).float() if guidance_scale != 1.0 else None
        self.guidance_scale = guidance_scale

    def __call__(self, indices) -> Conditioning:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Conditioning(self.embeddings[idx % len(self.prompts)], self.uncond, self.guidance_scale)


def clip_text_encoder(text_encoder: torch.nn.Module, tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """``encode(prompts)``: the text encoder's last hidden states over padded tokens, as Stable Diffusion's."""

    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        device = next(text_encoder.parameters()).device
        return text_encoder(tokens.input_ids.to(device))[0].cpu()

    return encode


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.conditioning.prompts_file={str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"model.conditioning.prompts_file={str(path)!r} has no prompts (one per line)")
    return prompts
