"""One PTQ job per config: ``python -m ptq4dm.run`` (add ``-m`` and comma lists to sweep the axes).

config -> recipe (validated before anything is loaded) -> model and samplers -> full-precision samples
(cached across jobs) -> calibration (saved at once) -> quantized samples -> scores against the data and against
the full-precision images -> results.json (written last), ranges.csv, sample grids, W&B, a printed table.

What a job folder promises (see ptq4dm/experiment/job.py): a finished job is skipped only when its config, the
package's code, the libraries, the device and the inputs (model files, reference data) are what they were;
otherwise the difference is logged, the earlier outputs are moved to ``superseded/`` and the job is computed
again. An interrupted job resumes its saved calibration and only the image shards made with it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ptq4dm.calibration import RangeChoice
from ptq4dm.data import load_cifar10
from ptq4dm.data.cifar10 import data_fingerprint
from ptq4dm.diffusion import Sampler
from ptq4dm.evaluation import SamplingModule, SeedDataModule, generate_images
from ptq4dm.experiment.fp_cache import FPCacheEntry, extractor_key, fp_cache_entry, scores_key
from ptq4dm.experiment.job import CALIBRATION, JobFolder
from ptq4dm.experiment.module import PTQModule
from ptq4dm.experiment.over_seeds import SEED_KEYS
from ptq4dm.experiment.provenance import deciding, device_name, provenance
from ptq4dm.experiment.recipe import AXES, PTQRecipe, recipe_from_config
from ptq4dm.experiment.summary import record_job
from ptq4dm.metrics import make_extractor
from ptq4dm.metrics.fidelity import check_metric_files
from ptq4dm.metrics.reference import load_statistics, reference_fingerprint, save_statistics, statistics_digest
from ptq4dm.metrics.scoring import (
    fid_over_fp,
    image_statistics,
    inception_scores,
    metrics_device,
    note_inception_input,
    pixel_errors,
    reference_from_config,
    score,
)
from ptq4dm.models.factory import check_model_files, load_model, model_identity
from ptq4dm.models.schedule import given_arguments
from ptq4dm.models.unet import DiffusionModel
from ptq4dm.quant import save_quantized
from ptq4dm.quant.api import check_exclude
from ptq4dm.quant.checkpoint import FILENAME as QUANT_CHECKPOINT
from ptq4dm.utils.config import save_resolved_config
from ptq4dm.utils.images import image_grid
from ptq4dm.utils.io import atomic_write_json, atomic_write_text
from ptq4dm.utils.loggers import check_logger, finish_logger, make_logger
from ptq4dm.utils.table import markdown_table

log = logging.getLogger(__name__)

# Where a job may stop, saved (``stop_after``): running it again without it resumes from there.
STOP_POINTS = ("calibration", "samples")
HEADLINE = ["model", "fid", "fid_over_fp", "fid_over_fp_se", "sfid", "kid", "precision", "recall", "isc", "fid_vs_fp",
            "psnr_vs_fp"]


@contextmanager
def stage(name: str, seconds: dict[str, float]):
    """Log a job stage's start and end, and keep its wall time: where a long job spends its time."""
    log.info("stage %s ...", name)
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0
    log.info("stage %s: %.1f s", name, seconds[name])


def is_rank_zero() -> bool:
    """Rank 0 of a DDP job (or the only process) owns the job folder and the caches' locks."""
    return rank_zero_only.rank == 0


def job_record(cfg: DictConfig, recipe: PTQRecipe, device: torch.device) -> dict:
    """What decides a job's numbers besides randomness: its config, the code, libraries and device, and the
    identity of its inputs (model files, reference data, calibration images). Cheap: nothing is loaded."""
    inputs = {"model": model_identity(cfg.model)}
    if cfg.data.name != "none":
        ref = cfg.metrics.reference
        inputs["reference"] = reference_fingerprint(cfg.data.root, ref.split, cfg.data.format, ref.cache_dir)
    if recipe.calibration.source.needs_images:
        inputs["calibration_images"] = data_fingerprint(cfg.data.root, cfg.data.split, cfg.data.format)
    return {"config_digest": config_digest(cfg), **deciding(device), "inputs": inputs}


def prepare_job_folder(job: JobFolder, record: dict, force: bool) -> tuple[dict | None, dict | None]:
    """(finished results to return as they are, or None; a saved calibration to resume, or None)."""
    done = job.finished()
    if done is not None:
        differs = job.differences(done, record)
        if not differs and not force:
            log.info("already done with the same config, code and inputs: %s/results.json (force=true "
                     "recomputes)", job.path)
            return done, None
        reason = "force=true" if force else "computed again because " + "; ".join(differs)
        log.warning("%s holds a finished result; %s", job.path, reason)
        job.set_aside(reason)
        return None, None
    saved = None if force else job.calibration(record, QUANT_CHECKPOINT)
    if saved is None:
        job.clear_unfinished("force=true" if force else "made under another config, code or inputs, or incomplete")
    else:
        log.info("resuming %s with its saved calibration (%s)", job.path, QUANT_CHECKPOINT)
        job.prune_samples(job.samples_dir(saved))
    return None, saved


def batches_to_sample(num_samples: int, batch_size: int, folder: Path) -> tuple[int, int]:
    """(batches still to sample, all batches) for a shard folder."""
    return len(SeedDataModule(num_samples, batch_size, folder).todo()), -(-num_samples // batch_size)


def sample_full_precision(cfg: DictConfig, model: DiffusionModel, sampler: Sampler, trainer_kwargs: dict,
                          entry: FPCacheEntry) -> torch.Tensor | None:
    """FP images from the shared cache, sampling only the batches no earlier job made (None off rank 0).
    One process at a time per cache entry: a second one with the same images waits, then reuses them."""
    module = SamplingModule(model.unet, sampler, seed=cfg.seed, precision=str(cfg.eval.precision),
                            image_shape=model.image_shape, compile=cfg.eval.compile, decoder=model.decoder,
                            conditioner=model.conditioner)
    with entry.lock() if is_rank_zero() else nullcontext():
        todo, total = batches_to_sample(cfg.eval.num_samples, cfg.eval.batch_size, entry.shards)
        t0 = time.perf_counter()
        images = generate_images(module, cfg.eval.num_samples, cfg.eval.batch_size, entry.shards, trainer_kwargs)
        if images is not None and todo == total and not entry.timing.exists():  # timed only if sampled whole
            atomic_write_json(entry.timing, {"sampling_seconds": time.perf_counter() - t0})
    return images


def score_full_precision(cfg: DictConfig, entry: FPCacheEntry, images: torch.Tensor, extractor,
                         reference, reference_digest: str | None) -> tuple:
    """FP statistics (keyed by the extractor) and scores (keyed by the reference statistics themselves)."""
    features_key = extractor_key(extractor, cfg.metrics)
    with entry.lock():
        stats_file = entry.features(features_key)
        if not stats_file.exists():
            save_statistics(image_statistics(images, extractor, cfg.metrics.batch_size, "full precision"), stats_file)
        stats = load_statistics(stats_file)  # as stored, also the first time: every job scores against the same
        scores_file = entry.scores(scores_key(features_key, reference_digest, cfg.metrics))
        if scores_file.exists():
            scores = json.loads(scores_file.read_text())
        else:
            scores = {**score(stats, reference, cfg), **inception_scores(images, cfg, extractor_device(extractor))}
            atomic_write_json(scores_file, scores)
    timing = json.loads(entry.timing.read_text()) if entry.timing.exists() else {"sampling_seconds": None}
    scores["sampling_seconds"] = timing["sampling_seconds"]  # None: sampled across interrupted runs
    return stats, scores


def quantized_sampling_seconds(shards: Path, todo: int, total: int, seconds: float) -> float | None:
    """The quantized images' sampling time: this run's ``seconds`` if it sampled all ``total`` batches (kept beside
    the shards for a later run that only scores), the kept time if it sampled none, None if split over runs."""
    timing = shards / "timing.json"
    if todo == total:
        atomic_write_json(timing, {"sampling_seconds": seconds})
        return seconds
    if todo:  # some sampled now, some earlier: no one run's time (and a kept one is no longer these images')
        timing.unlink(missing_ok=True)
        return None
    return json.loads(timing.read_text())["sampling_seconds"] if timing.is_file() else None


def stopped(job: JobFolder, point: str, stages: dict[str, float]) -> dict:
    """``stop_after``: what is done is saved in the job folder; the same command without it resumes from there."""
    print(f"stopped after {point} (stop_after={point}): " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
          + f"; saved in {job.path}. The same command without stop_after resumes there and scores.")
    return {"status": "stopped", "stop_after": point, "stage_seconds": stages}


def grouped(rows: list[dict], shown: int = 3) -> list[dict]:
    """Rows of the same kind and reason as one: how many, and the first few names."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["reason"]), []).append(r["name"])
    return [{"kind": kind, "count": len(names), "reason": reason,
             "names": ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")}
            for (kind, reason), names in groups.items()]


def reconstruction_summary(rows: list[dict]) -> dict:
    """Totals of the per-unit table (reconstruction.csv): units, seconds, summed output errors before and after.
    A method of several stages (recon=qdiffusion) has them per stage only: each stage has its own loss."""
    if not rows:
        return {}
    by_stage: dict[str, list[dict]] = {}
    for r in rows:
        by_stage.setdefault(r.get("stage") or "", []).append(r)
    if len(by_stage) == 1:
        return _recon_totals(rows)
    return {"units": len({r["unit"] for r in rows}), "seconds": sum(r["seconds"] for r in rows),
            "stages": {stage: _recon_totals(part) for stage, part in by_stage.items()}}


def _recon_totals(rows: list[dict]) -> dict:
    summary = {"units": len(rows), "seconds": sum(r["seconds"] for r in rows),
               "loss_before": sum(r["loss_before"] for r in rows), "loss_after": sum(r["loss_after"] for r in rows),
               "units_improved": sum(r["loss_after"] < r["loss_before"] for r in rows)}
    if all(r.get("held_out_after") is not None for r in rows):  # recon.method.held_out > 0: the same, unseen
        summary.update(held_out_before=sum(r["held_out_before"] for r in rows),
                       held_out_after=sum(r["held_out_after"] for r in rows))
    return summary


def extractor_device(extractor) -> torch.device:
    return next(extractor.parameters()).device


def calibrate_or_restore(module: PTQModule, job: JobFolder, record: dict, saved: dict | None,
                         source: dict) -> dict:
    """This job's calibration, computed and saved at once (rank 0), or restored from its saved checkpoint.

    Under DDP rank 0 calibrates and saves, then every other rank takes that very file, so all ranks sample
    with one state, and the shard folder is keyed by its digest."""
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if is_rank_zero():
        if saved is None:
            module.calibrate()
            save_quantized(module.unet, job.path, extra=module.output_quantizer, decoder=module.quantized_decoder,
                           source=source)
            atomic_write_text(job.path / "ranges.csv", ranges_csv(module.ranges))
            if module.reconstruction:
                atomic_write_text(job.path / "reconstruction.csv", table_csv([asdict(r) for r in module.reconstruction]))
            saved = job.save_calibration(record, QUANT_CHECKPOINT, {
                "ranges": [asdict(r) for r in module.ranges], "timings": module.timings,
                "reconstruction": [asdict(r) for r in module.reconstruction],
                "full_precision": [asdict(f) for f in module.full_precision],
                "calibration_timesteps": module.calibration_set.t.tolist(), "restored": False})
        else:
            module.restore(job.path, [RangeChoice(**r) for r in saved["ranges"]], saved["timings"])
            saved = {**saved, "restored": True}
        if group:
            dist.barrier()
        return saved
    if group:
        dist.barrier()
    saved = job.calibration(record, QUANT_CHECKPOINT)
    if saved is None:
        raise RuntimeError(f"rank {rank_zero_only.rank} found no calibration of rank 0 in {job.path}")
    module.restore(job.path, [RangeChoice(**r) for r in saved["ranges"]], saved["timings"])
    return saved


def ranges_csv(ranges: list[RangeChoice]) -> str:
    return table_csv([asdict(r) for r in ranges or []])


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def log_job(logger, cfg: DictConfig, results: dict, ranges: list[RangeChoice], grids: dict,
            reconstruction: list[dict]) -> None:
    if not logger:
        return
    logger.log_hyperparams({**results["axes"], "bits_weight": cfg.bits.weight, "bits_act": cfg.bits.act,
                            "calib_samples": cfg.calib.num_samples, "eval_samples": cfg.eval.num_samples,
                            "config": OmegaConf.to_container(cfg, resolve=True),
                            "provenance": results["provenance"]})
    flat = {f"{group}/{k}": v for group in ("fp", "quantized") for k, v in results[group].items()
            if isinstance(v, (int, float)) and v is not None}
    flat.update({f"time/{k}": v for k, v in results["timings"].items() if isinstance(v, (int, float))})
    logger.log_metrics(flat)
    if type(logger).__name__ == "WandbLogger":
        rows = [asdict(r) for r in ranges or []]
        if rows:
            logger.log_table("calibration/ranges", columns=list(rows[0]), data=[list(r.values()) for r in rows])
        if reconstruction:  # each unit's output error before and after reconstruction
            logger.log_table("calibration/reconstruction", columns=list(reconstruction[0]),
                             data=[list(r.values()) for r in reconstruction])
        if results["full_precision"]:
            fp = results["full_precision"]
            logger.log_table("calibration/full_precision", columns=list(fp[0]), data=[list(r.values()) for r in fp])
        logger.log_image("samples", images=list(grids.values()), caption=list(grids))


# recon.method keys added to the presets after jobs had run with them, each with the value that computes what those
# jobs computed and the keys that only matter beside it: at that value they stay out of the digest, so the jobs
# are still recognised as done.
RECON_KEYS_ADDED_LATER = {"held_out": (0, ()), "learn_weight_scale": (False, ("weight_scale_lr",)),
                          "learn_weights": (True, ()), "act_lr_schedule": ("constant", ())}


def config_digest(cfg: DictConfig) -> str:
    """What a job computes, as a hash: the resolved config without where it writes and how it reports."""
    # recipe (a recipe/ preset) names the choices the other keys hold; it computes nothing itself
    keep = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in ("output_dir", "progress", "force", "stop_after", "logger", "recipe")}
    if not keep["ops"].get("decoder"):  # added later; off, it computes what jobs before it computed
        keep["ops"].pop("decoder", None)
    if (keep.get("balance") or {}).get("method") is None:  # added later; none computes what jobs before it did
        keep.pop("balance", None)
    method = (keep.get("recon") or {}).get("method") or {}
    for key, (default, companions) in RECON_KEYS_ADDED_LATER.items():
        if key in method and method[key] == default and type(method[key]) is type(default):
            for gone in (key, *companions):
                method.pop(gone, None)
    keep["metrics"].pop("fid_bootstrap", None)  # added later; it adds a standard error, the scores are the same
    if keep["model"].get("factory") is not None and isinstance(keep["model"].get("scheduler"), dict):
        keep["model"]["scheduler"] = given_arguments(keep["model"]["scheduler"])  # null: not given (added later)
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def check_recipe_preset(cfg: DictConfig) -> None:
    """A recipe/ preset's axes as it chose them: a command-line choice on one of them (bits=w8a8 beside
    recipe=best_w4a8) would win over the preset's and carry the preset's keys onto another preset."""
    preset = OmegaConf.select(cfg, "recipe", default=None)
    for axis, name in ({} if preset is None else preset.axes).items():
        chosen = OmegaConf.select(cfg, f"{axis}.name", default=None)
        if chosen != name:
            raise ValueError(f"recipe={preset.name} is measured with {axis}={name}, but {axis}={chosen} was given: "
                             f"allowed beside it is {axis}={name} (or no {axis}=); for another {axis} choose its own "
                             "preset (conf/recipe/) or set the axes one by one")


def checked_recipe(cfg: DictConfig) -> PTQRecipe:
    """Every axis validated and the input files and logger checked, before the job folder is touched or anything
    heavy happens: an error here is the user's config or file, not the job's."""
    check_recipe_preset(cfg)
    recipe = recipe_from_config(cfg)
    if OmegaConf.select(cfg, "data.limit", default=None) is not None:
        raise ValueError(f"data.limit={cfg.data.limit}: ptq4dm.run reads whole splits (FID reference statistics, "
                         "calibration images); allowed here is null (the limit is ptq4dm.train's)")
    if cfg.stop_after not in (None, *STOP_POINTS):
        raise ValueError(f"stop_after={cfg.stop_after!r}: allowed are null (the whole job), 'calibration' (calibrate "
                         "and save the calibration) and 'samples' (also sample FP and quantized images, saved; no "
                         "scoring)")
    check_model_files(cfg.model)
    if cfg.stop_after is None:  # a job stopped before scoring reads neither network
        check_metric_files(cfg.metrics.inception_path, cfg.metrics.isc_weights_path)
    check_logger(cfg.logger)
    return recipe


def run(cfg: DictConfig, recipe: PTQRecipe | None = None) -> dict:
    """One job; ``recipe``: ``checked_recipe(cfg)`` if the caller has it already."""
    started = time.perf_counter()
    recipe = checked_recipe(cfg) if recipe is None else recipe
    device = metrics_device(cfg.trainer)
    record = job_record(cfg, recipe, device)
    job, rank_zero = JobFolder(cfg.output_dir), is_rank_zero()
    saved = None
    if rank_zero:  # other DDP ranks only exist while rank 0 samples: it decided already
        done, saved = prepare_job_folder(job, record, cfg.force)
        if done is not None:
            return done
        save_resolved_config(cfg, job.path)
    torch.set_float32_matmul_precision("high")
    stages: dict[str, float] = {}
    with stage("setup", stages):
        model = load_model(cfg.model)
        check_exclude(model.unet, recipe.quant.exclude, key="ops.exclude", of=f"model={cfg.model.name}")
        if recipe.method.reconstruction is not None:
            recipe.method.reconstruction.check_network(model.unet)
        if model.decoder is not None and recipe.calibration.source.needs_images:
            raise ValueError(f"calib={cfg.calib.name} feeds real images, which a latent model ({cfg.model.name}) does "
                             "not take: allowed with latent models are the trajectory and noise sources (gaussian_ts, "
                             "uniform_ts, single_ts, random_ts, noise)")
        if recipe.calibration.source.needs_images and model.image_shape[0] != 3:
            raise ValueError(f"calib={cfg.calib.name} feeds the data set's RGB images, but model={cfg.model.name} takes "
                             f"{model.image_shape[0]}-channel inputs (model.image_shape={list(model.image_shape)}): "
                             "allowed are the trajectory and noise sources (gaussian_ts, uniform_ts, single_ts, "
                             "random_ts, noise)")
        if recipe.quantize_decoder and model.decoder is None:
            raise ValueError(f"ops.decoder=true: model={cfg.model.name} samples pixels and has no VAE decoder to "
                             "quantize; allowed only with latent pipelines (model=pipeline, ldm_celebahq, "
                             "stable_diffusion)")
        sampler = Sampler(model.scheduler, **cfg.sampler)
        calib_sampler = Sampler(model.scheduler, **recipe.calib_sampler)
        calib_images = None
        if recipe.calibration.source.needs_images:
            calib_images = load_cifar10(cfg.data.root, cfg.data.split, cfg.data.format, cfg.data.cache_dir).images
        if cfg.stop_after is None:  # the networks are only read for scoring
            extractor = make_extractor(device, cfg.metrics.inception_path)
            reference = reference_from_config(cfg, extractor)  # None with data=none: scores against FP images only
            reference_digest = None if reference is None else statistics_digest(reference)
        entry = fp_cache_entry(cfg, record["inputs"]["model"], deciding(device), device.type == "cuda")
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer), "enable_progress_bar": bool(cfg.progress)}

    # Every DDP rank takes part in both sampling runs; rank 0 alone calibrates, scores and writes.
    if cfg.stop_after != "calibration":
        with stage("fp_samples", stages):
            fp_images = sample_full_precision(cfg, model, sampler, trainer_kwargs, entry)
    module = PTQModule(model.unet, sampler, calib_sampler, recipe, cfg.seed, str(cfg.eval.precision),
                       calib_images, progress=bool(cfg.progress), image_shape=model.image_shape,
                       compile=cfg.eval.compile, decoder=model.decoder, conditioner=model.conditioner)
    with stage("calibration", stages):
        module.to(device)
        calibration = calibrate_or_restore(module, job, record, saved,
                                           {"model": cfg.model.name, "model_identity": record["inputs"]["model"]})
    if cfg.stop_after == "calibration":
        return stopped(job, "calibration", stages)
    shards = job.samples_dir(calibration)
    with stage("quantized_samples", stages):
        todo, total = batches_to_sample(cfg.eval.num_samples, cfg.eval.batch_size, shards)
        q_images = generate_images(module, cfg.eval.num_samples, cfg.eval.batch_size, shards, trainer_kwargs)
    if q_images is None or fp_images is None:
        return {}  # a non-zero DDP rank
    q_seconds = quantized_sampling_seconds(shards, todo, total, stages["quantized_samples"])
    if cfg.stop_after == "samples":
        return stopped(job, "samples", stages)
    with stage("scoring", stages):
        scored_as = note_inception_input(q_images, log)
        fp_stats, fp_scores = score_full_precision(cfg, entry, fp_images, extractor, reference, reference_digest)
        q_stats = image_statistics(q_images, extractor, cfg.metrics.batch_size, "quantized")
        q_scores = {**score(q_stats, reference, cfg), **inception_scores(q_images, cfg, device),
                    **score(q_stats, fp_stats, cfg, suffix="_vs_fp"), **pixel_errors(q_images, fp_images),
                    "sampling_seconds": q_seconds}
        q_scores.update(fid_over_fp(q_stats, fp_stats, reference, q_scores["fid"], fp_scores["fid"],
                                    cfg.metrics.fid_bootstrap, device, cfg.seed))

    results = {
        "status": "ok",
        "config_digest": record["config_digest"],
        "record": record,  # what a re-run compares before it skips this job
        "provenance": provenance(device),
        "axes": recipe.axes,
        "overrides": task_overrides(),
        "fp": fp_scores,
        "quantized": q_scores,
        "calibration_restored": calibration["restored"],  # true: resumed with the calibration saved earlier
        "timings": {**calibration["timings"], "sampling_seconds_fp": fp_scores["sampling_seconds"],
                    "sampling_seconds_quantized": q_seconds,
                    **{f"stage_seconds_{k}": v for k, v in stages.items()}},
        "num_samples": cfg.eval.num_samples,
        "num_calibration_samples": cfg.calib.num_samples,
        "calibration_timesteps": calibration["calibration_timesteps"],
        "reconstruction": reconstruction_summary(calibration.get("reconstruction") or []),
        "full_precision": calibration.get("full_precision", []),  # what stays in full precision, and why
        "reference": None if reference is None else f"{reference.name} ({reference.num_images} images)",
        "reference_digest": reference_digest,
        "inception_input": scored_as,  # "1 channel repeated to 3" for grayscale images
        "seed": cfg.seed,
        # the calibration seeds as resolved (interpolations and defaults included): the seed table groups by them
        "calibration_seeds": {k: OmegaConf.select(cfg, k, default=None) for k in SEED_KEYS},
        "device": device_name(device),
    }
    n = cfg.eval.grid_size
    grids = {"full precision": image_grid(fp_images[:n]), "quantized": image_grid(q_images[:n])}
    for name, grid in grids.items():
        grid.save(job.path / f"samples_{name.replace(' ', '_')}.png")
    job.write_results(results)  # last: from here on the job is finished

    rows = [{"model": "full precision", **fp_scores}, {"model": f"quantized ({recipe.axes['bits']})", **q_scores}]
    print(f"\n{' | '.join(f'{k}={v}' for k, v in recipe.axes.items())} | {cfg.eval.num_samples} samples, "
          f"{cfg.calib.num_samples} calibration samples, calibration "
          f"{calibration['timings'].get('calibration_seconds', float('nan')):.1f} s"
          f"{' (restored)' if calibration['restored'] else ''}\n{markdown_table(rows, HEADLINE)}\n")
    if results["full_precision"]:
        print(f"In full precision (every one in results.json, full_precision):\n"
              f"{markdown_table(grouped(results['full_precision']), ['kind', 'count', 'reason', 'names'])}\n")
    logger = make_logger(cfg.logger, **wandb_names(cfg))
    try:
        log_job(logger, cfg, results, module.ranges, grids, calibration.get("reconstruction") or [])
    finally:
        finish_logger(logger)
    print(f"job wall time {time.perf_counter() - started:.0f} s (after Python start-up): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + f"; results in {job.path}")
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


def record_failure(cfg: DictConfig, err: BaseException, to_logger: bool = True) -> Path:
    """The failure goes beside the job's results (never over a finished one) and, with ``to_logger``, to the job's
    W&B run."""
    failure = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
               "axes": _axes_or_empty(cfg), "overrides": task_overrides(), "time": time.time()}
    path = JobFolder(cfg.output_dir).record_failure(failure)
    if not to_logger:
        return path
    try:
        logger = make_logger(cfg.logger, **wandb_names(cfg))
    except Exception:  # noqa: BLE001 - the logger config itself may be what failed; the record has it all
        return path
    try:
        if logger:
            logger.log_hyperparams({**failure["axes"], "status": "failed"})
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.summary.update({"status": "failed", "error": failure["error"],
                                                  "traceback": failure["traceback"]})
    finally:
        finish_logger(logger, failed=True)
    return path


def _axes_or_empty(cfg: DictConfig) -> dict:
    """The axis choices as far as the config says them (it may be the config that failed)."""
    axes = {k: OmegaConf.select(cfg, f"{k}.name", default=None) for k in AXES}
    axes["sampler"] = f"{OmegaConf.select(cfg, 'sampler.name')}-{OmegaConf.select(cfg, 'sampler.steps')}"
    return axes


def _record_in_sweep(cfg: DictConfig, status: str, outcome: Path) -> None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and is_rank_zero():
        record_job(hc.sweep.dir, hc.job.num, cfg.output_dir, status, outcome.name, task_overrides())


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> None:
    checked = False
    try:
        recipe = checked_recipe(cfg)
        checked = True
        results = run(cfg, recipe)
    except Exception as err:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        # a single job's config mistake is reported on the spot: no W&B run for a job that never started
        outcome = record_failure(cfg, err, to_logger=checked or multirun) if is_rank_zero() else None
        if multirun:  # one failed job must not end the sweep; its end says so
            log.error("job failed: %s (details in %s)", err, outcome)
            if outcome is not None:
                _record_in_sweep(cfg, "failed", outcome)
            return
        if not checked and isinstance(err, (ValueError, FileNotFoundError, ImportError)):  # config, file, package
            print(f"error: {err}\n(nothing was computed{f'; recorded in {outcome}' if outcome else ''})",
                  file=sys.stderr)
            sys.exit(2)
        raise
    if results.get("status") == "stopped":  # resumable: its saved calibration says where it stands
        _record_in_sweep(cfg, "stopped", Path(cfg.output_dir) / CALIBRATION)
    else:
        _record_in_sweep(cfg, "ok", Path(cfg.output_dir) / "results.json")


if __name__ == "__main__":
    main()
