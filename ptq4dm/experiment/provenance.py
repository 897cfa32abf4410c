"""Where a number came from: the code, the libraries and the device that computed it.

``provenance()`` is recorded in every ``results.json``. Its ``deciding`` part (the digest of the package's own
source files, the versions of the libraries that compute samples and scores, the device) is what a finished
job is compared on before it is skipped: a code change, a library upgrade or another GPU recomputes the job
(saying what differs) instead of answering "already done" with old numbers. The git commit and dirty flag are
recorded too, for the reader; they do not decide anything, since the source digest already covers uncommitted
changes and a commit that only touches the README changes no number.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The libraries whose version can change a sample or a score.
LIBRARIES = ("torch", "diffusers", "torch-fidelity", "pytorch-lightning", "numpy", "scipy", "transformers")


@functools.cache
def code_digest() -> str:
    """sha256 over the package's Python sources and shipped assets (path and bytes of each file)."""
    h = hashlib.sha256()
    files = sorted(p for p in PACKAGE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and p.suffix not in (".pyc", ".pyo"))
    for path in files:
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device: torch.device | str | None = None) -> str:
    """The accelerator that computes (its product name), or ``cpu``."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


@functools.cache
def git_state() -> dict[str, str | bool | None]:
    """The commit and dirty flag of the checkout the package runs from; nulls for an installed copy."""
    root = PACKAGE_DIR.parent
    if not (root / ".git").exists():
        return {"git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def deciding(device: torch.device | str | None = None) -> dict:
    """What, besides the config and the inputs, decides a job's numbers."""
    return {"code_digest": code_digest(), "libraries": library_versions(), "device": device_name(device)}


def provenance(device: torch.device | str | None = None) -> dict:
    """Everything recorded about where a result was computed."""
    from ptq4dm import __version__

    return {"ptq4dm": __version__, **git_state(), **deciding(device), "python": platform.python_version(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None, "platform": platform.platform()}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two records (nested dicts flattened)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text
