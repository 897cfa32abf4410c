"""Reading checkpoints without running code from them.

PyTorch checkpoints are pickles, and a pickle can run any code when it is loaded. Files are read with
``torch.load(weights_only=True)`` (tensors and plain containers only); one that needs more is refused with a
message, unless the caller says the file is trusted. Model weights ship as safetensors, which hold no code.
"""

from __future__ import annotations

import pickle
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
