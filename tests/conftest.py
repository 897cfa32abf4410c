"""Shared fixtures: small data sets in each supported layout, a small registered feature extractor, paths."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptq4dm.data import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]
# A subprocess running a job or a sweep: about 1 to 4 minutes on an idle 2-core machine; the limit allows a
# machine ten or more times slower (a loaded CI host) before a test reports a hang.
SUBPROCESS_TIMEOUT = 3600
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"  # present in development and CI, not on users' machines

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache, so nothing depends on a developer's ~/.cache."""
    monkeypatch.setenv("PTQ4DM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def shared_cifar10() -> Path:
    if not (SHARED_CIFAR10 / "cifar10-test.tar.xz").exists():
        pytest.skip(f"the CIFAR-10 JPEG copy is not at {SHARED_CIFAR10}")
    return SHARED_CIFAR10


def synthetic_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Smooth random images (N, H, W, 3) uint8: structured enough for features to differ between sets."""
    g = np.random.default_rng(seed)
    low = g.uniform(0, 255, size=(n, 4, 4, 3))
    up = np.kron(low, np.ones((1, size // 4, size // 4, 1)))
    return np.clip(up + g.normal(0, 12, size=up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder_root(tmp_path_factory) -> Path:
    """``{train,test}/<class>/*.png`` with 4 images per class in train, 2 in test."""
    root = tmp_path_factory.mktemp("image_folder")
    for split, per_class in (("train", 4), ("test", 2)):
        images = synthetic_images(per_class * 10, seed=1 if split == "train" else 2)
        for i, im in enumerate(images):
            folder = root / split / CIFAR10_CLASSES[i % 10]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def python_batches_root(tmp_path_factory) -> Path:
    """The standard cifar-10-batches-py layout, 6 images per batch."""
    root = tmp_path_factory.mktemp("python_batches")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images = synthetic_images(6, seed=10 + k)
        batch = {b"data": images.transpose(0, 3, 1, 2).reshape(6, -1), b"labels": [k % 10] * 6}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture(scope="session")
def small_extractor():
    """A small fixed random conv net registered with torch-fidelity under the FID extractor's feature names.

    A test double for the 87 MB Inception network where only the metric plumbing is under test; the real
    network is exercised separately in test_metrics.py.
    """
    from tests.small_extractor import register_small_extractor

    return register_small_extractor()


def run_module_in_process(module: str, args: list[str], monkeypatch) -> int:
    """``python -m module *args`` in this process (runpy, as ``-m`` runs it, without a new interpreter's ~10 s of
    imports); returns the exit status a process would have had."""
    import runpy
    import sys
    import traceback

    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # noqa: BLE001 - as the interpreter ends on an uncaught exception (Hydra re-raises one under
        traceback.print_exc()  # HYDRA_FULL_ERROR=1 or a tracer such as coverage): the traceback on stderr, status 1
        return 1
    return 0
