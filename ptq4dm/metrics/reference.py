"""Reference statistics of a data set, computed once and cached on disk, keyed by data set and extractor.

Lookup order: the user cache (statistics plus a feature subset for KID and precision/recall, keyed by the data
set's files), then the statistics shipped in the package (so FID against CIFAR-10 works with no data set at
hand), then computing them from the data at ``data.root``. ``reference_fingerprint`` names the source the
lookup will use without reading it; ``statistics_digest`` identifies the statistics themselves.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ptq4dm.data import DataNotFoundError, load_cifar10
from ptq4dm.data.cifar10 import find_layout, layout_key
from ptq4dm.metrics.fidelity import ImageStatistics, extract_features
from ptq4dm.metrics.inception import EXTRACTOR_NAME
from ptq4dm.utils.io import atomic_save_npy, default_cache_dir

log = logging.getLogger(__name__)

SHIPPED_STATS_DIR = Path(__file__).resolve().parent.parent / "assets" / "fid_stats"


def stats_filename(dataset: str, extractor: str = EXTRACTOR_NAME) -> str:
    return f"{dataset}__{extractor}.npz"


def load_statistics(path: str | Path) -> ImageStatistics:
    with np.load(path) as z:
        return ImageStatistics.from_arrays(z)


def save_statistics(stats: ImageStatistics, path: str | Path, with_features: bool = True) -> Path:
    atomic_save_npy(path, **stats.to_arrays(with_features=with_features))
    return Path(path)


def statistics_digest(stats: ImageStatistics) -> str:
    """sha256 of the Gaussian statistics (every layer's mean and covariance): what FID and sFID are against."""
    h = hashlib.sha256()
    for layer in sorted(stats.stats):
        for key in ("mu", "sigma"):
            h.update(f"{layer}/{key}".encode() + np.ascontiguousarray(stats.stats[layer][key], np.float64).tobytes())
    return h.hexdigest()


def _sources(root: str, split: str, format: str, cache: Path, max_features: int = 10000, seed: int = 0):
    """(data layout or None, the statistics files to try in order) for a split; computed ones are keyed by the
    features they keep for KID and precision/recall too (``max_features`` drawn with ``seed``; the jobs' is 0, so
    every job compares against the same reference features)."""
    try:
        layout = find_layout(Path(root).expanduser(), split, format)
    except DataNotFoundError:
        shipped = sorted(SHIPPED_STATS_DIR.glob(stats_filename(f"cifar10-{split}-*")))
        cached = sorted(cache.glob(stats_filename(f"cifar10-{split}-*")))
        return None, shipped + cached  # the shipped statistics are the known ones; then any computed earlier
    dataset = f"cifar10-{split}-{layout.format}"
    # Computed statistics are cached under the data's own key: another folder with the same layout is other data.
    computed = f"{dataset}-{layout_key(layout)}-features{max_features}" + (f"-seed{seed}" if seed else "")
    return layout, [cache / stats_filename(computed), SHIPPED_STATS_DIR / stats_filename(dataset)]


def reference_fingerprint(root: str, split: str = "train", format: str = "auto", cache_dir: str | None = None) -> str:
    """What the statistics will come from, cheaply: the data set's files when present (whether or not its
    statistics are cached yet), else the statistics file that will be read."""
    cache = Path(cache_dir or default_cache_dir() / "fid_stats")
    layout, files = _sources(root, split, format, cache)
    if layout is not None:
        return f"data {layout.format}:{layout_key(layout)}"
    for path in files:
        if path.parent == SHIPPED_STATS_DIR:  # part of the package: its bytes are in the code digest
            return f"shipped statistics {path.name}"
        stat = path.stat()
        return f"statistics {path}:{stat.st_size}:{stat.st_mtime_ns}"
    return "none"


def reference_statistics(root: str, split: str = "train", format: str = "auto", extractor=None,
                         cache_dir: str | None = None, max_features: int = 10000, batch_size: int = 200,
                         seed: int = 0, progress: bool = True, **_ignored) -> ImageStatistics:
    """Statistics of a CIFAR-10 split for FID/sFID, with up to ``max_features`` features for KID and PRC."""
    cache = Path(cache_dir or default_cache_dir() / "fid_stats")
    layout, files = _sources(root, split, format, cache, max_features, seed)
    if layout is None:
        for path in files:
            log.info("no CIFAR-10 %s split at data.root=%s: FID against the statistics in %s", split, root, path)
            return load_statistics(path)
        find_layout(Path(root).expanduser(), split, format)  # raises DataNotFoundError naming what was looked for
    dataset = f"cifar10-{split}-{layout.format}"
    for path in files:
        if path.exists():
            return load_statistics(path)
    if extractor is None:
        raise ValueError("reference statistics must be computed, but no feature extractor was given")
    images = load_cifar10(root, split, format).images
    log.info("computing reference statistics of %s (%d images); cached for later runs", dataset, len(images))
    features = extract_features(images, extractor, batch_size=batch_size, progress=progress, desc=dataset)
    stats = ImageStatistics.from_features(dataset, EXTRACTOR_NAME, features)
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_features]
    stats.features = {layer: f[keep] for layer, f in features.items() if layer == "2048"}
    save_statistics(stats, files[0])
    return load_statistics(files[0])  # as stored: the first job scores against what later ones read
