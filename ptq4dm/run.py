"""One PTQ job per config: ``python -m ptq4dm.run`` (add ``-m`` and comma lists to sweep the axes).

config -> recipe (validated before anything is loaded) -> model and samplers -> full-precision samples
(cached across jobs) -> calibration and quantized samples (the LightningModule) -> scores against the data
and against the full-precision images -> results.json, ranges.csv, sample grids, W&B, a printed table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ptq4dm.data import load_cifar10
from ptq4dm.diffusion import Sampler
from ptq4dm.evaluation import SamplingModule, generate_images
from ptq4dm.experiment.fp_cache import fp_cache_dir
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.recipe import AXES, recipe_from_config
from ptq4dm.metrics import make_extractor
from ptq4dm.metrics.reference import load_statistics, save_statistics
from ptq4dm.metrics.scoring import (
    image_statistics,
    inception_scores,
    metrics_device,
    pixel_errors,
    reference_from_config,
    score,
)
from ptq4dm.models.factory import load_model
from ptq4dm.models.unet import DiffusionModel
from ptq4dm.quant import save_quantized
from ptq4dm.utils.config import save_resolved_config
from ptq4dm.utils.images import image_grid
from ptq4dm.utils.io import atomic_write_json, atomic_write_text
from ptq4dm.utils.loggers import finish_logger, make_logger
from ptq4dm.utils.table import markdown_table

log = logging.getLogger(__name__)

HEADLINE = ["model", "fid", "sfid", "kid", "precision", "recall", "isc", "fid_vs_fp", "psnr_vs_fp"]


@contextmanager
def stage(name: str, seconds: dict[str, float]):
    """Log a job stage's start and end, and keep its wall time: where a long job spends its time."""
    log.info("stage %s ...", name)
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0
    log.info("stage %s: %.1f s", name, seconds[name])


def sample_full_precision(cfg: DictConfig, model: DiffusionModel, sampler: Sampler,
                          trainer_kwargs: dict) -> torch.Tensor | None:
    """FP images from the shared cache, sampling only the batches no earlier job made (None off rank 0)."""
    folder = fp_cache_dir(cfg)
    module = SamplingModule(model.unet, sampler, seed=cfg.seed, precision=cfg.eval.precision,
                            image_shape=model.image_shape, compile=cfg.eval.compile, decoder=model.decoder,
                            conditioner=model.conditioner)
    t0 = time.perf_counter()
    images = generate_images(module, cfg.eval.num_samples, cfg.eval.batch_size, folder / "shards", trainer_kwargs)
    timing_file = folder / "timing.json"
    if images is not None and not timing_file.exists():
        atomic_write_json(timing_file, {"sampling_seconds": time.perf_counter() - t0})
    return images


def score_full_precision(cfg: DictConfig, images: torch.Tensor, extractor, reference) -> tuple:
    """FP statistics and scores, cached beside the FP images."""
    folder = fp_cache_dir(cfg)
    stats_file, scores_file = folder / "features.npz", folder / "scores.json"
    if stats_file.exists():
        stats = load_statistics(stats_file)
    else:
        stats = image_statistics(images, extractor, cfg.metrics.batch_size, "full precision")
        save_statistics(stats, stats_file)
    if scores_file.exists():
        scores = json.loads(scores_file.read_text())
    else:
        scores = {**score(stats, reference, cfg), **inception_scores(images, cfg, extractor_device(extractor))}
        atomic_write_json(scores_file, scores)
    scores["sampling_seconds"] = json.loads((folder / "timing.json").read_text())["sampling_seconds"]
    return stats, scores


def extractor_device(extractor) -> torch.device:
    return next(extractor.parameters()).device


def ranges_csv(module: PTQModule) -> str:
    buf = io.StringIO()
    rows = [asdict(r) for r in module.ranges or []]
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def log_job(logger, cfg: DictConfig, results: dict, module: PTQModule, grids: dict) -> None:
    if not logger:
        return
    logger.log_hyperparams({**results["axes"], "bits_weight": cfg.bits.weight, "bits_act": cfg.bits.act,
                            "calib_samples": cfg.calib.num_samples, "eval_samples": cfg.eval.num_samples,
                            "config": OmegaConf.to_container(cfg, resolve=True)})
    flat = {f"{group}/{k}": v for group in ("fp", "quantized") for k, v in results[group].items()
            if isinstance(v, (int, float)) and v is not None}
    flat.update({f"time/{k}": v for k, v in results["timings"].items()})
    logger.log_metrics(flat)
    if type(logger).__name__ == "WandbLogger":
        rows = [asdict(r) for r in module.ranges or []]
        if rows:
            logger.log_table("calibration/ranges", columns=list(rows[0]), data=[list(r.values()) for r in rows])
        logger.log_image("samples", images=list(grids.values()), caption=list(grids))


def config_digest(cfg: DictConfig) -> str:
    """What a job computes, as a hash: the resolved config without where it writes and how it reports."""
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("output_dir", "progress", "force", "logger")}
    if not keep["ops"].get("decoder"):  # added later; off, it computes what jobs before it computed
        keep["ops"].pop("decoder", None)
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def finished_results(cfg: DictConfig) -> dict | None:
    """The results of this very job from an earlier run (same resolved config), if it finished."""
    path = Path(cfg.output_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "ok" and results.get("config_digest") == config_digest(cfg) else None


def run(cfg: DictConfig) -> dict:
    recipe = recipe_from_config(cfg)  # validates every axis before anything heavy happens
    if not cfg.force and (done := finished_results(cfg)):
        log.info("already done with the same config: %s/results.json (force=true recomputes)", cfg.output_dir)
        return done
    out = Path(cfg.output_dir)
    save_resolved_config(cfg, out)
    torch.set_float32_matmul_precision("high")
    device = metrics_device(cfg.trainer)
    stages: dict[str, float] = {}
    with stage("setup", stages):
        model = load_model(cfg.model)
        if model.decoder is not None and recipe.calibration.source.needs_images:
            raise ValueError(f"calib={cfg.calib.name} feeds real images, which a latent model ({cfg.model.name}) does "
                             "not take: allowed with latent models are the trajectory and noise sources (gaussian_ts, "
                             "uniform_ts, single_ts, random_ts, noise)")
        if recipe.quantize_decoder and model.decoder is None:
            raise ValueError(f"ops.decoder=true: model={cfg.model.name} samples pixels and has no VAE decoder to "
                             "quantize; allowed only with latent pipelines (model=pipeline, ldm_celebahq, "
                             "stable_diffusion)")
        sampler = Sampler(model.scheduler, **cfg.sampler)
        calib_sampler = Sampler(model.scheduler, **recipe.calib_sampler)
        calib_images = None
        if recipe.calibration.source.needs_images:
            calib_images = load_cifar10(cfg.data.root, cfg.data.split, cfg.data.format, cfg.data.cache_dir).images
        extractor = make_extractor(device, cfg.metrics.inception_path)
        reference = reference_from_config(cfg, extractor)  # None with data=none: scores against FP images only
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer), "enable_progress_bar": bool(cfg.progress)}

    # Every DDP rank takes part in both sampling runs; rank 0 alone scores and writes.
    with stage("fp_samples", stages):
        fp_images = sample_full_precision(cfg, model, sampler, trainer_kwargs)
    module = PTQModule(model.unet, sampler, calib_sampler, recipe, cfg.seed, cfg.eval.precision, calib_images,
                       progress=bool(cfg.progress), image_shape=model.image_shape, compile=cfg.eval.compile,
                       decoder=model.decoder, conditioner=model.conditioner)
    with stage("calibrate_and_sample", stages):
        q_images = generate_images(module, cfg.eval.num_samples, cfg.eval.batch_size, out / "samples",
                                   trainer_kwargs)
    if q_images is None or fp_images is None:
        return {}  # a non-zero DDP rank
    q_seconds = stages["calibrate_and_sample"] - module.timings.get("calibration_seconds", 0.0)
    with stage("scoring", stages):
        fp_stats, fp_scores = score_full_precision(cfg, fp_images, extractor, reference)
        q_stats = image_statistics(q_images, extractor, cfg.metrics.batch_size, "quantized")
        q_scores = {**score(q_stats, reference, cfg), **inception_scores(q_images, cfg, device),
                    **score(q_stats, fp_stats, cfg, suffix="_vs_fp"), **pixel_errors(q_images, fp_images),
                    "sampling_seconds": q_seconds}

    results = {
        "status": "ok",
        "config_digest": config_digest(cfg),
        "axes": recipe.axes,
        "overrides": task_overrides(),
        "fp": fp_scores,
        "quantized": q_scores,
        "timings": {**module.timings, "sampling_seconds_fp": fp_scores["sampling_seconds"],
                    "sampling_seconds_quantized": q_seconds,
                    **{f"stage_seconds_{k}": v for k, v in stages.items()}},
        "num_samples": cfg.eval.num_samples,
        "num_calibration_samples": cfg.calib.num_samples,
        "calibration_timesteps": module.calibration_set.t.tolist() if module.ranges else None,
        "reference": None if reference is None else f"{reference.name} ({reference.num_images} images)",
        "seed": cfg.seed,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if module.ranges is not None:  # reload with ptq4dm.quant.load_quantized to sample without recalibrating
        save_quantized(module.unet, out, extra=module.output_quantizer, decoder=module.quantized_decoder)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "ranges.csv", ranges_csv(module))
    n = cfg.eval.grid_size
    grids = {"full precision": image_grid(fp_images[:n]), "quantized": image_grid(q_images[:n])}
    for name, grid in grids.items():
        grid.save(out / f"samples_{name.replace(' ', '_')}.png")

    rows = [{"model": "full precision", **fp_scores}, {"model": f"quantized ({recipe.axes['bits']})", **q_scores}]
    print(f"\n{' | '.join(f'{k}={v}' for k, v in recipe.axes.items())} | {cfg.eval.num_samples} samples, "
          f"{cfg.calib.num_samples} calibration samples, calibration "
          f"{module.timings.get('calibration_seconds', float('nan')):.1f} s\n{markdown_table(rows, HEADLINE)}\n")
    logger = make_logger(cfg.logger, **wandb_names(cfg))
    try:
        log_job(logger, cfg, results, module, grids)
    finally:
        finish_logger(logger)
    return results


def task_overrides() -> list[str]:
    """The job's command-line and sweep overrides (empty outside a Hydra app)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def wandb_names(cfg: DictConfig) -> dict:
    """Run name and sweep group for W&B (ignored by other loggers)."""
    if OmegaConf.select(cfg, "logger._target_", default="") != "pytorch_lightning.loggers.WandbLogger":
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {"name": hc.job.override_dirname or "default",
            "group": f"sweep {hc.sweep.dir}" if multirun else None, "job_type": "ptq"}


def record_failure(cfg: DictConfig, err: BaseException) -> None:
    """The failure goes where results would have gone: results.json and the job's W&B run."""
    failure = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
               "axes": _axes_or_empty(cfg)}
    atomic_write_json(Path(cfg.output_dir) / "results.json", failure)
    try:
        logger = make_logger(cfg.logger, **wandb_names(cfg))
    except Exception:  # noqa: BLE001 - the logger config itself may be what failed; results.json has it all
        return
    try:
        if logger:
            logger.log_hyperparams({**failure["axes"], "status": "failed"})
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.summary.update({"status": "failed", "error": failure["error"],
                                                  "traceback": failure["traceback"]})
    finally:
        finish_logger(logger, failed=True)


def _axes_or_empty(cfg: DictConfig) -> dict:
    """The axis choices as far as the config says them (it may be the config that failed)."""
    axes = {k: OmegaConf.select(cfg, f"{k}.name", default=None) for k in AXES}
    axes["sampler"] = f"{OmegaConf.select(cfg, 'sampler.name')}-{OmegaConf.select(cfg, 'sampler.steps')}"
    return axes


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as err:
        record_failure(cfg, err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # one failed job must not end the sweep
            log.error("job failed: %s (details in %s/results.json)", err, cfg.output_dir)
            return
        raise


if __name__ == "__main__":
    main()
