"""Reading checkpoints without running code from them.

PyTorch checkpoints are pickles, and a pickle can run any code when it is loaded. Files are read with
``torch.load(weights_only=True)`` (tensors and plain containers only); one that needs more is refused with a
message, unless the caller says the file is trusted. Model weights ship as safetensors, which hold no code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint wanted to run code while loading and was refused."""


def load_checkpoint(path: str | Path, trusted: bool = False, trust_key: str = "trust_checkpoint"):
    """``torch.load`` that refuses code-executing pickles unless ``trusted``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} was refused: loading it would run code it carries ({str(err).splitlines()[0]}). "
            f"Only if you trust where the file comes from, set {trust_key}=true."
        ) from err


class CheckpointError(ValueError):
    """A weights file that cannot be read as what its config key expects; the message names key and path."""


def read_state_dict(path: str | Path, key: str = "model.checkpoint", trusted: bool = False,
                    trust_key: str = "model.trust_checkpoint") -> dict[str, torch.Tensor]:
    """Tensors by name from a ``.safetensors`` file or a torch file (read with ``weights_only=True``; a
    Lightning-style ``{"state_dict": ...}`` is unwrapped). Every failure names ``key``, the path and what was
    expected, never only the reader's internal error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    expected = "a .safetensors file or a torch.save file of tensors by name"
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist: expected {expected}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{key}={str(path)!r} is not a readable safetensors file ({err}): expected "
                                  f"{expected}") from err
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle (b"\x80" + protocol).
        if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
            raise CheckpointError(f"{key}={str(path)!r} is neither a torch.save file (zip archive or pickle) nor "
                                  f"named .safetensors: expected {expected}")
        try:
            state = load_checkpoint(path, trusted, trust_key)
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise CheckpointError(f"{key}={str(path)!r} could not be read as a torch checkpoint "
                                  f"({type(err).__name__}: {err}): expected {expected}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        found = {k: type(v).__name__ for k, v in list(state.items())[:5]} if isinstance(state, dict) \
            else type(state).__name__
        raise CheckpointError(f"{key}={str(path)!r} does not hold tensors by name (found {found}): expected "
                              f"{expected}")
    return state
