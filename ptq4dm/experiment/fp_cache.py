"""Full-precision samples, their Inception features and scores, cached on disk and shared by every job of a
sweep that samples the same images.

An entry's folder is keyed by everything the FP images depend on: the model's files (every weight file, any
format, and a prompts file's contents), the sampler, seeds, sample count, batch size, precision, device, the
package's code and the libraries' versions. Inside it, features are keyed by the extractor and scores by the
reference statistics' own digest, so FP and quantized scores of a job are always against the same reference.
A file lock per entry makes a second process that wants the same images wait for the first and reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from ptq4dm.utils.io import default_cache_dir

log = logging.getLogger(__name__)


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class FPCacheEntry:
    def __init__(self, folder: Path):
        self.folder = folder
        self.shards = folder / "shards"
        self.timing = folder / "timing.json"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held while sampling or scoring this entry: a concurrent job with the same images waits, then reuses."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder) + ".lock")
        try:
            lock.acquire(timeout=0)
        except TimeoutError:
            log.info("another process is computing %s: waiting for it", self.folder)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def features(self, extractor_key: str) -> Path:
        return self.folder / f"features-{extractor_key}.npz"

    def scores(self, scores_key: str) -> Path:
        return self.folder / f"scores-{scores_key}.json"


def fp_cache_entry(cfg: DictConfig, model_identity: str, deciding: dict, gpu: bool) -> FPCacheEntry:
    """The cache entry of a job's FP images. ``deciding``: the code, libraries and device (provenance)."""
    ident = {"model": model_identity, "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
             "seed": cfg.seed, "num_samples": cfg.eval.num_samples, "batch_size": cfg.eval.batch_size,
             "precision": cfg.eval.precision if gpu else "fp32", "compile": bool(cfg.eval.get("compile", False)),
             **deciding}
    root = Path(cfg.fp_cache_dir) if cfg.get("fp_cache_dir") else default_cache_dir() / "fp_samples"
    name = f"{cfg.model.name}-{cfg.sampler.name}{cfg.sampler.steps}-n{cfg.eval.num_samples}-seed{cfg.seed}-{_key(ident)}"
    return FPCacheEntry(root / name)


def extractor_key(extractor, metrics: DictConfig) -> str:
    """Features depend on the extractor (the FID Inception file is checked against its sha1 when loaded) and
    its batch size."""
    return _key({"extractor": extractor.get_name(), "class": type(extractor).__qualname__,
                 "batch_size": metrics.batch_size})


def scores_key(extractor: str, reference_digest: str | None, metrics: DictConfig) -> str:
    """Scores depend on the features, the reference statistics themselves, and the metric settings."""
    settings = OmegaConf.to_container(metrics, resolve=True)
    settings.pop("fid_bootstrap", None)  # the FP scores do not depend on it (it is about the quantized ones)
    return _key({"features": extractor, "reference": reference_digest, "metrics": settings})
