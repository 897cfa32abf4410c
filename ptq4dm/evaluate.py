"""Sample a diffusion model and score the images: ``python -m ptq4dm.evaluate model=small_cifar10``.

``quantized=<folder of a ptq4dm.run job>`` samples the quantized model saved there (quantization.safetensors)
instead, without recalibrating. Writes ``results.json``, the resolved ``config.yaml`` and a sample grid to the run folder and prints a table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ptq4dm.diffusion import Sampler
from ptq4dm.evaluation import SamplingModule, generate_images
from ptq4dm.metrics import make_extractor
from ptq4dm.metrics.fidelity import check_metric_files
from ptq4dm.metrics.scoring import (
    image_statistics,
    inception_scores,
    metrics_device,
    note_inception_input,
    reference_from_config,
    score,
)
from ptq4dm.experiment.job import file_digest, set_aside
from ptq4dm.experiment.provenance import device_name, provenance
from ptq4dm.experiment.recipe import check_job, check_sampler_outputs
from ptq4dm.models.factory import check_model_files, load_model, model_identity
from ptq4dm.quant.checkpoint import checkpoint_path
from ptq4dm.quant.config import QuantConfig
from ptq4dm.quant import checkpoint_source, load_quantized, quantizes_decoder, read_quant_config, set_fused_kernels
from ptq4dm.quant.sampler_outputs import SamplerOutputQuantizer
from ptq4dm.utils.config import save_resolved_config
from ptq4dm.utils.images import save_grid
from ptq4dm.utils.io import atomic_write_json
from ptq4dm.utils.table import markdown_table

log = logging.getLogger(__name__)


def check_quantized_source(cfg: DictConfig) -> None:
    """A ``quantized=`` checkpoint must belong to ``model``: compared by the model files' digest it records
    (or, for older checkpoints, the model name in the job folder's config.yaml), before any model is loaded."""
    source = checkpoint_source(cfg.quantized)
    if source.get("model_identity"):
        if source["model_identity"] != model_identity(cfg.model):
            raise ValueError(f"quantized={cfg.quantized!r} was calibrated on model={source.get('model')!r} (other "
                             f"files than model={cfg.model.name}'s now): allowed is the model it was made for, "
                             f"model={source.get('model')}")
        return
    config = Path(cfg.quantized).expanduser() / "config.yaml"
    if config.is_file():
        saved = OmegaConf.load(config).get("model", {})
        if saved.get("name") != cfg.model.name or saved.get("pretrained") != cfg.model.get("pretrained"):
            raise ValueError(f"quantized={cfg.quantized!r} was calibrated on model={saved.get('name')!r} "
                             f"(pretrained={saved.get('pretrained')!r}), not on model={cfg.model.name}: allowed "
                             f"is the model it was made for")


# What one evaluation writes in its folder besides its image shards; an earlier run's are moved aside, not replaced.
OUTPUTS = ("results.json", "config.yaml", "samples.png")


def set_aside_earlier_results(out: Path) -> Path | None:
    """An earlier evaluation's results in ``out`` (a reused ``output_dir`` or ``hydra.run.dir``) go to
    ``superseded/<UTC time>/``: nothing already computed is replaced."""
    if not (out / "results.json").exists():
        return None
    return set_aside(out, [out / name for name in OUTPUTS if (out / name).exists()],
                     "another ptq4dm.evaluate run was started in the same folder")


def images_key(cfg: DictConfig) -> str:
    """A digest of what decides the sampled images (model files, quantized checkpoint, sampler, seed, precision,
    batching): their shards are kept under it, so a run never scores another run's images."""
    quantized = file_digest(checkpoint_path(cfg.quantized)) if cfg.quantized else None
    decides = {"model": model_identity(cfg.model), "quantized": quantized,
               "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "seed": cfg.seed,
               "precision": str(cfg.eval.precision), "compile": bool(cfg.eval.compile),
               "batch_size": cfg.eval.batch_size}
    return hashlib.sha1(json.dumps(decides, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checked_inputs(cfg: DictConfig) -> QuantConfig | None:
    """Values in range, the quantized checkpoint (its config, None without one) made for this model, and the metric
    files: checked before anything is loaded or written."""
    check_job(cfg)
    check_model_files(cfg.model)
    quant_config = None
    if cfg.quantized:
        try:
            quant_config = read_quant_config(cfg.quantized)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"quantized={cfg.quantized!r}: {err}") from err
        except ValueError as err:
            raise ValueError(f"quantized={cfg.quantized!r}: {err}") from err
        check_quantized_source(cfg)
        try:  # its sampler-output quantizers need a sampler step that has those outputs
            check_sampler_outputs(quant_config.sampler_outputs, OmegaConf.to_container(cfg.sampler, resolve=True))
        except ValueError as err:
            raise ValueError(f"quantized={cfg.quantized!r} was made with {err}") from err
    check_metric_files(cfg.metrics.inception_path, cfg.metrics.isc_weights_path)
    return quant_config


def evaluate(cfg: DictConfig) -> dict:
    return evaluate_checked(cfg, checked_inputs(cfg))


def evaluate_checked(cfg: DictConfig, quant_config: QuantConfig | None) -> dict:
    """``evaluate`` once ``checked_inputs(cfg)`` gave ``quant_config``."""
    torch.set_float32_matmul_precision("high")
    out = Path(cfg.output_dir)
    set_aside_earlier_results(out)
    save_resolved_config(cfg, out)
    shards = out / "samples" / images_key(cfg)  # only a run that makes the same images resumes from them
    model = load_model(cfg.model)
    sampler = Sampler(model.scheduler, **cfg.sampler)
    extractor = make_extractor(metrics_device(cfg.trainer), cfg.metrics.inception_path)
    reference = reference_from_config(cfg, extractor)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer)
    t0 = time.perf_counter()
    sampling = SamplingModule(model.unet.eval(), sampler, seed=cfg.seed, precision=str(cfg.eval.precision),
                              image_shape=model.image_shape, compile=cfg.eval.compile, decoder=model.decoder,
                              conditioner=model.conditioner)
    if quant_config is not None:
        outputs = quant_config.sampler_outputs
        extra = SamplerOutputQuantizer(outputs, quant_config.act_spec()) if outputs else None
        decoder = None
        if quantizes_decoder(cfg.quantized):
            if model.decoder is None:
                raise ValueError(f"quantized={cfg.quantized!r} was made with ops.decoder=true, but model="
                                 f"{cfg.model.name} samples pixels and has no VAE decoder")
            decoder = model.decoder.autoencoder.decoder
        load_quantized(model.unet, cfg.quantized, extra, decoder)
        set_fused_kernels(model.unet, not cfg.eval.compile)
        sampling.output_quantizer = extra
    images = generate_images(sampling, cfg.eval.num_samples, cfg.eval.batch_size, shards, trainer_kwargs)
    if images is None:  # a non-zero DDP rank: rank 0 scores and writes
        return {}
    sampling_seconds = time.perf_counter() - t0
    save_grid(images[: cfg.eval.grid_size], out / "samples.png")
    scores = score(image_statistics(images, extractor, cfg.metrics.batch_size), reference, cfg)
    scores.update(inception_scores(images, cfg, metrics_device(cfg.trainer)))
    scores["reference"] = None if reference is None else f"{reference.name} ({reference.num_images} images)"
    scores["inception_input"] = note_inception_input(images, log)
    results = {
        "model": cfg.model.name,
        "quantized": str(cfg.quantized) if cfg.quantized else None,
        "sampler": f"{cfg.sampler.name}-{cfg.sampler.steps}",
        "num_samples": cfg.eval.num_samples,
        "seed": cfg.seed,
        "autocast": str(cfg.eval.precision),
        **scores,
        "sampling_seconds": round(sampling_seconds, 2),
        "device": device_name(metrics_device(cfg.trainer)),
        "provenance": provenance(metrics_device(cfg.trainer)),
    }
    atomic_write_json(out / "results.json", results)
    print(markdown_table([results], ["model", "sampler", "num_samples", "fid", "sfid", "kid", "precision",
                                     "recall", "isc", "sampling_seconds"]))
    log.info("results in %s", out)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        quant_config = checked_inputs(cfg)
    except (ValueError, FileNotFoundError, ImportError) as err:  # the config, a file or a package: one line
        print(f"error: {err}\n(nothing was computed)", file=sys.stderr)
        sys.exit(2)
    evaluate_checked(cfg, quant_config)


if __name__ == "__main__":
    main()
