"""Quantized checkpoints: every quantizer's range and grid, with the config that placed them.

Only quantization parameters are stored (safetensors; the network's own weights stay wherever the model comes
from). Loading re-applies ``quantize_`` with the stored config and splits to a full-precision copy of the
same network, then restores the parameters: no recalibration, and the same outputs as before saving.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ptq4dm.quant.api import quantize_, quantizers
from ptq4dm.quant.config import QuantConfig
from ptq4dm.quant.modules import QuantLayer
from ptq4dm.utils.io import atomic_path

FILENAME = "quantization.safetensors"
_BUFFERS = ("lo", "hi", "scale", "zero_point", "calibrated", "rounding")
_OPTIONAL = ("rounding",)  # absent from checkpoints written before learned rounding existed


def save_quantized(model: nn.Module, folder: str | Path, extra: nn.Module | None = None,
                   decoder: nn.Module | None = None, source: dict | None = None) -> Path:
    """Write the quantization parameters of ``model`` (and of ``extra``, e.g. sampler-output quantizers, and of
    ``decoder``, a latent model's VAE decoder quantized with ``QuantConfig.for_decoder``). ``source`` says which
    full-precision model they belong to (``{"model": name, "model_identity": digest}``), so that loading them
    onto another model can be refused before it is loaded."""
    config = getattr(model, "quant_config", None)
    if config is None:
        raise ValueError("model is not quantized (no quant_config): call quantize_ first")
    parts = {"model": model, "extra": extra, "decoder": decoder}
    tensors = {f"{part}.{name}.{b}": getattr(q, b).detach().cpu().contiguous()
               for part, module in parts.items() if module is not None
               for name, q in quantizers(module).items() for b in _BUFFERS}
    tensors.update({f"balance.{name}": layer.balance.detach().cpu().contiguous()  # channel balance factors
                    for name, layer in _balanced(model)})
    tensors.update({f"balance_shift.{name}": layer.balance_shift.detach().cpu().contiguous()  # and shifts
                    for name, layer in _balanced(model) if layer.balance_shift is not None})
    meta = {"quant_config": asdict(config), "edges": getattr(model, "quant_edges", None),
            "edge_roles": getattr(model, "quant_edge_roles", None),
            "splits": {n: m.split for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.split},
            "disabled": _disabled(model), "decoder_disabled": None if decoder is None else _disabled(decoder),
            "source": source or {}}
    path = Path(folder) / FILENAME
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ptq4dm": json.dumps(meta)})
    return path


def _balanced(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLayer) and m.balance is not None]


def _disabled(module: nn.Module) -> list[str]:
    """The quantizers calibration switched off (left in full precision)."""
    return [n for n, q in quantizers(module).items() if not q.enabled]


def checkpoint_path(folder: str | Path) -> Path:
    """``folder/quantization.safetensors``, or ``folder`` itself when it is that file."""
    path = Path(folder).expanduser()
    return path / FILENAME if path.is_dir() else path


def _read(folder: str | Path, tensors: bool = False) -> tuple[Path, dict, dict]:
    """(path, metadata, tensors if asked) of a checkpoint; any unreadable file fails naming the path."""
    path = checkpoint_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized checkpoint at {path} (a ptq4dm.run job folder holds {FILENAME})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["ptq4dm"])
            values = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a ptq4dm quantized checkpoint (a safetensors file written by "
                         f"ptq4dm.run with 'ptq4dm' metadata): {type(err).__name__}: {err}") from err
    return path, meta, values


def _read_meta(folder: str | Path) -> dict:
    return _read(folder)[1]


def checkpoint_source(folder: str | Path) -> dict:
    """Which full-precision model a checkpoint was calibrated on (``model``, ``model_identity``), if recorded."""
    return _read_meta(folder).get("source") or {}


def read_quant_config(folder: str | Path) -> QuantConfig:
    """The QuantConfig a checkpoint was made with (without loading its tensors)."""
    return QuantConfig(**_read_meta(folder)["quant_config"])


def quantizes_decoder(folder: str | Path) -> bool:
    """Whether a checkpoint holds a latent model's VAE decoder too (``ops.decoder=true``)."""
    return _read_meta(folder).get("decoder_disabled") is not None


def load_quantized(model: nn.Module, folder: str | Path, extra: nn.Module | None = None,
                   decoder: nn.Module | None = None) -> nn.Module:
    """Quantize ``model`` (full precision, same architecture) in place as saved; every tensor must match.

    ``decoder``: the full-precision VAE decoder, quantized in place too when the checkpoint holds one.
    """
    path, meta, tensors = _read(folder, tensors=True)
    _check_decoder(path, meta, decoder)
    config = QuantConfig(**meta["quant_config"])
    edges = meta.get("edges")  # None: written before edges were recorded (registration order then)
    quantize_(model, config, edges=None if edges is None else set(edges), edge_roles=meta.get("edge_roles"))
    if decoder is not None:
        quantize_(decoder, config.for_decoder())
    return _restore(path, meta, tensors, model, extra, decoder)


def restore_quantized(model: nn.Module, folder: str | Path, extra: nn.Module | None = None,
                      decoder: nn.Module | None = None) -> nn.Module:
    """Give a network that ``quantize_`` already prepared with the checkpoint's own config (a job resuming its
    saved calibration) the saved ranges, splits and switched-off quantizers; every tensor must match."""
    path, meta, tensors = _read(folder, tensors=True)
    _check_decoder(path, meta, decoder)
    if QuantConfig(**meta["quant_config"]) != getattr(model, "quant_config", None):
        raise ValueError(f"{path} was made with another QuantConfig than this network's: {meta['quant_config']}")
    if meta.get("edges") is not None and meta["edges"] != getattr(model, "quant_edges", None):
        raise ValueError(f"{path} raised other first/last layers {meta['edges']} than this network's "
                         f"{getattr(model, 'quant_edges', None)}")
    return _restore(path, meta, tensors, model, extra, decoder)


def _check_decoder(path: Path, meta: dict, decoder: nn.Module | None) -> None:
    saved_decoder = meta.get("decoder_disabled") is not None
    if saved_decoder and decoder is None:
        raise ValueError(f"{path} quantizes a VAE decoder too (ops.decoder=true): pass decoder=autoencoder.decoder")
    if decoder is not None and not saved_decoder:
        raise ValueError(f"{path} holds no VAE decoder (ops.decoder=false): leave decoder=None")


def _restore(path: Path, meta: dict, tensors: dict, model: nn.Module, extra: nn.Module | None,
             decoder: nn.Module | None) -> nn.Module:
    for name, split in meta["splits"].items():
        model.get_submodule(name).set_split(split)
    targets = {f"{part}.{n}": q for part, module in (("model", model), ("extra", extra), ("decoder", decoder))
               if module is not None for n, q in quantizers(module).items()}
    balance = {k: v for k, v in tensors.items() if k.startswith("balance.")}
    shifts = {k.removeprefix("balance_shift."): v for k, v in tensors.items() if k.startswith("balance_shift.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("balance.", "balance_shift."))}
    expected = {f"{n}.{b}" for n in targets for b in _BUFFERS}
    required = {k for k in expected if k.rsplit(".", 1)[1] not in _OPTIONAL}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    unknown = sorted(k for k in balance if k.removeprefix("balance.") not in layers)
    if unknown:
        raise ValueError(f"{path} does not fit this network: balance factors for layers it lacks {unknown[:5]}")
    orphans = sorted(f"balance_shift.{k}" for k in shifts if f"balance.{k}" not in balance)
    if orphans:
        raise ValueError(f"{path} is inconsistent: balance shifts without balance factors {orphans[:5]}")
    for key, factors in balance.items():
        name = key.removeprefix("balance.")
        layers[name].set_balance(factors, shifts.get(name))
    if not required <= set(tensors) <= expected:
        missing, unexpected = sorted(required - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path} does not fit this network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, q in targets.items():
            state = {b: tensors[f"{name}.{b}"] for b in _BUFFERS if f"{name}.{b}" in tensors}
            q.load_state_dict(state, strict=False)
            if state.get("rounding") is not None and state["rounding"].numel():
                q.set_rounding(state["rounding"])
    for name in meta["disabled"]:
        targets[f"model.{name}"].enabled = False
    for name in meta.get("decoder_disabled") or []:
        targets[f"decoder.{name}"].enabled = False
    for network in (m for m in (model, decoder) if m is not None):
        for layer in network.modules():
            if isinstance(layer, QuantLayer):
                layer.freeze_weight()
    return model
