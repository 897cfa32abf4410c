"""Scoring image sets from a job's config: the reference data set, generated sets, and pixel errors."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ptq4dm.metrics.bootstrap import paired_fid_difference
from ptq4dm.metrics.fidelity import (
    FID_LAYER,
    ImageStatistics,
    compute_metrics,
    extract_features,
    inception_input,
    inception_score,
)
from ptq4dm.metrics.reference import reference_statistics


def metrics_device(trainer_cfg: DictConfig) -> torch.device:
    """The device Inception runs on: the first GPU when the trainer may use one, else the CPU."""
    wants_gpu = trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def reference_from_config(cfg: DictConfig, extractor) -> ImageStatistics | None:
    """The data set's statistics: cached, shipped, or computed now; None with ``data=none`` (no data set: images
    are scored against the full-precision ones only). Called before any sampling, so a missing data set stops
    a job before its expensive part."""
    if cfg.data.name == "none":
        return None
    ref = cfg.metrics.reference
    return reference_statistics(cfg.data.root, ref.split, cfg.data.format, extractor, ref.cache_dir,
                                ref.max_features, cfg.metrics.batch_size)


def image_statistics(images: torch.Tensor, extractor, batch_size: int, name: str = "samples") -> ImageStatistics:
    return ImageStatistics.from_features(name, extractor.get_name(), extract_features(images, extractor, batch_size))


def score(generated: ImageStatistics, reference: ImageStatistics | None, cfg: DictConfig, suffix: str = "") -> dict:
    """FID, sFID, KID and precision/recall of ``generated`` against ``reference``; keys get ``suffix``. Without
    a reference (``data=none``) every score is None."""
    if reference is None:
        return {f"{k}{suffix}": None for k in ("fid", "sfid", "kid", "kid_std", "precision", "recall")}
    scores = compute_metrics(generated, reference, cfg.metrics.kid_subset_size, cfg.metrics.kid_subsets)
    return {f"{k}{suffix}": v for k, v in scores.items()}


def fid_over_fp(q_stats: ImageStatistics, fp_stats: ImageStatistics, reference: ImageStatistics | None,
                q_fid: float | None, fp_fid: float | None, replicates: int, device, seed: int = 0) -> dict:
    """FID over FP (quantized minus full precision, both against the data set) and, with ``replicates`` > 0, its
    standard error over draws of the evaluation noise (metrics/bootstrap.py); None where not computable (no data
    set, or FP statistics cached without features)."""
    out = {"fid_over_fp": None if q_fid is None or fp_fid is None else q_fid - fp_fid, "fid_over_fp_se": None}
    q, fp = q_stats.features.get(FID_LAYER), fp_stats.features.get(FID_LAYER)
    if replicates and out["fid_over_fp"] is not None and q is not None and fp is not None and len(q) == len(fp):
        # the FP features are cached in float16: the quantized ones rounded the same way, so both sets match
        spread = paired_fid_difference(q.half().float().to(device), fp.float().to(device),
                                       reference.stats[FID_LAYER], replicates, seed)
        out["fid_over_fp_se"] = spread["se"]
    return out


def inception_scores(images: torch.Tensor, cfg: DictConfig, device) -> dict:
    """Inception Score where weights with a classifier exist; None otherwise (never estimated)."""
    return inception_score(images, cfg.metrics.isc_weights_path, device, cfg.metrics.batch_size) \
        or {"isc": None, "isc_std": None}


def note_inception_input(images: torch.Tensor, log) -> str:
    """``inception_input`` for results.json, said once in the log when the images are not RGB."""
    note = inception_input(images.shape[1])
    if images.shape[1] == 1:
        log.info("the images have 1 channel: it is repeated to 3 for Inception (FID, sFID, KID, precision/recall, IS), "
                 "i.e. they are scored as grayscale RGB images")
    return note


def pixel_errors(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean per-image MSE (images in [0, 1]) and PSNR (dB) of ``images`` against same-seed ``reference``."""
    diff = images.float().div(255) - reference.float().div(255)
    mse = diff.pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))
    return {"mse_vs_fp": float(mse.mean()), "psnr_vs_fp": float(psnr.mean())}
