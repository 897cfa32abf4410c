"""From the config groups (ops, bits, calib, metric, sampler) to the objects a job runs with.

Everything here is cheap and runs before any model is loaded, so a bad value stops the job at once with a
message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import AcceleratorRegistry

from ptq4dm.calibration import (CalibrationRecipe, CalibrationSource, ChannelBalance, RangeMetric, RangeSearch,
                                TimestepDistribution)
from ptq4dm.diffusion.sampler import SAMPLERS, check_prediction_type
from ptq4dm.engine import PTQMethod
from ptq4dm.models.factory import custom_schedule, training_timesteps
from ptq4dm.quant import QuantConfig
from ptq4dm.reconstruction import Reconstruction
from ptq4dm.utils.targets import build_typed

AXES = ("model", "sampler", "ops", "bits", "calib", "metric", "weight_metric", "recon", "balance")


@dataclass
class PTQRecipe:
    method: PTQMethod  # placement (QuantConfig), range search, reconstruction: what the engine runs
    calibration: CalibrationRecipe
    calib_sampler: dict  # the sampler the calibration trajectories follow
    axes: dict[str, str]  # the choice on each axis, for tables and W&B group-by
    quantize_decoder: bool = False  # a latent model's VAE decoder too (ops.decoder; QuantConfig.for_decoder)

    @property
    def quant(self) -> QuantConfig:
        return self.method.quant

    @property
    def search(self) -> RangeSearch:
        return self.method.search


def check_trainer(trainer: DictConfig) -> None:
    """Lightning's own checks of the trainer arguments (accelerator, devices, strategy, precision), run now
    by building a Trainer, instead of after the model is loaded."""
    import pytorch_lightning as pl

    kwargs = OmegaConf.to_container(trainer, resolve=True)
    quiet = logging.getLogger("pytorch_lightning")  # its "GPU available" lines come again when the job samples
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        pl.Trainer(**{**kwargs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False})
    except Exception as err:  # noqa: BLE001 - Lightning raises several kinds; all mean a bad trainer.* value
        given = ", ".join(f"trainer.{k}={v!r}" for k, v in kwargs.items()
                          if k in ("accelerator", "devices", "strategy", "precision", "num_nodes"))
        raise ValueError(f"trainer: {err} ({given}; accelerators here: "
                         f"{sorted(AcceleratorRegistry.available_accelerators())})") from err
    finally:
        quiet.setLevel(level)


def check_image_shape(model: DictConfig) -> None:
    shape = model.get("image_shape")
    if shape is None:
        return
    shape = list(shape)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError(f"model.image_shape={shape}: allowed is [C, H, W], three whole numbers of 1 or more")


def check_sampler(sampler: DictConfig | dict, key: str, num_train_timesteps: int = 1000,
                  prediction_type: str | None = None) -> dict:
    """A sampler node as a dict, its keys known and its values in range; with the model's
    ``prediction_type`` (when known before loading), also that the sampler can step with it."""
    if not isinstance(sampler, (dict, DictConfig)):
        raise ValueError(f"{key}={sampler!r}: allowed is a sampler node {{name, steps, eta}}"
                         + (" or null (the evaluation sampler)" if key == "calib.sampler" else ""))
    sampler = OmegaConf.to_container(sampler, resolve=True) if isinstance(sampler, DictConfig) else dict(sampler)
    unknown = sorted(set(sampler) - {"name", "steps", "eta"})
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; allowed are name, steps and eta")
    if sampler.get("name") not in SAMPLERS:
        raise ValueError(f"{key}.name={sampler.get('name')!r}: allowed are {sorted(SAMPLERS)}")
    if prediction_type is not None:
        check_prediction_type(sampler["name"], prediction_type, key)
    steps = sampler.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"{key}.steps={steps!r}: allowed is a whole number from 1 to {num_train_timesteps} "
                         "(the model's training steps)")
    eta = sampler.get("eta", 0.0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"{key}.eta={eta!r}: allowed is a number from 0 (deterministic DDIM) to 1")
    return sampler


def schedule_facts(model: DictConfig) -> tuple[int, str | None]:
    """(T, prediction type or None where only the model's files say it), before the model is loaded."""
    schedule = custom_schedule(model)
    T = training_timesteps(model) if schedule is None else schedule["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:  # else the sampler's check would name its steps
        raise ValueError(f"model.scheduler.num_train_timesteps={T!r}: allowed is a whole number of 1 or more")
    return T, None if schedule is None else schedule["prediction_type"]


def check_job(cfg: DictConfig) -> None:
    """The checks every entry point (ptq4dm.run, ptq4dm.evaluate) runs on what it shares, before loading."""
    for key in ("eval", "metrics"):  # ranges (types were checked when Hydra composed the config)
        OmegaConf.to_object(cfg[key])
    for key in ("seed", "calib.seed"):  # numpy's generators, which draw the noise, take no negative seed
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value < 0:
            raise ValueError(f"{key}={value}: allowed is a whole number of 0 or more")
    check_sampler(cfg.sampler, "sampler", *schedule_facts(cfg.model))
    check_image_shape(cfg.model)
    check_trainer(cfg.trainer)


def check_sampler_outputs(outputs: tuple[str, ...], sampler: dict) -> None:
    """Sampler-output quantization needs a DDPM/DDIM step, and a variance only exists in a stochastic one."""
    if not outputs:
        return
    if sampler["name"] not in ("ddim", "ddpm"):
        raise ValueError(f"ops.sampler_outputs={list(outputs)} needs sampler ddim or ddpm, not {sampler['name']!r}")
    if "variance" in outputs and sampler["name"] == "ddim" and not sampler.get("eta", 0) > 0:
        raise ValueError(f"ops.sampler_outputs includes variance, but sampler=ddim with sampler.eta="
                         f"{sampler.get('eta', 0)} adds no noise: use sampler=ddpm or sampler.eta > 0")


def recipe_from_config(cfg: DictConfig) -> PTQRecipe:
    """Every axis checked for ranges (Hydra checked the types: schema.py), then turned into the objects a job
    runs with."""
    ops, bits = cfg.ops, cfg.bits
    check_job(cfg)
    facts = schedule_facts(cfg.model)
    sampler = check_sampler(cfg.sampler, "sampler", *facts)
    for key in ("weight", "act"):
        value = bits[key]
        if value is not None and (not isinstance(value, int) or not 2 <= value <= 16):
            raise ValueError(f"bits.{key}={value!r}: allowed are whole numbers from 2 to 16, or null (full precision)")
    symmetric = ops.symmetric  # an ops preset that fixes the grids (ptq4dm_reference) overrides bits/
    quant = QuantConfig(
        weight_bits=bits.weight, act_bits=bits.act,
        weight_symmetric=bits.weight_symmetric if symmetric is None else symmetric,
        weight_per_channel=bits.weight_per_channel,
        act_symmetric=bits.act_symmetric if symmetric is None else symmetric, conv=ops.conv,
        linear=ops.linear, attn_matmul=ops.attn_matmul, first_last_bits=ops.first_last_bits,
        network_input=ops.network_input, shortcut_split=ops.shortcut_split, exclude=tuple(ops.exclude),
        sampler_outputs=tuple(ops.sampler_outputs), act_placement=ops.act_placement, edge_rule=ops.edge_rule,
        attention_projections=ops.attention_projections)
    check_sampler_outputs(quant.sampler_outputs, sampler)
    calibration = CalibrationRecipe(
        timesteps=build_typed(cfg.calib.timesteps, "calib.timesteps", TimestepDistribution),
        source=build_typed(cfg.calib.source, "calib.source", CalibrationSource),
        num_samples=cfg.calib.num_samples, batch_size=cfg.calib.batch_size, seed=cfg.calib.seed)
    if calibration.source.needs_images and cfg.data.name == "none":
        raise ValueError(f"calib={cfg.calib.name} draws real images, but data=none: choose a data set (data=cifar10)")
    search = RangeSearch(metric=build_typed(cfg.metric.fn, "metric.fn", RangeMetric),
                         num_candidates=cfg.metric.num_candidates,
                         weight_metric=build_typed(cfg.weight_metric.fn, "weight_metric.fn", RangeMetric),
                         max_values=cfg.metric.max_values, independent_ends=cfg.metric.independent_ends,
                         act_ema=ops.act_range_ema)
    reconstruction = None if cfg.recon.method is None else \
        build_typed(cfg.recon.method, "recon.method", Reconstruction)
    if reconstruction is not None:
        reconstruction.check(calibration.num_samples)
        reconstruction.check_bits(quant.weight_bits, quant.act_bits)
    balance = None if cfg.balance.method is None else \
        build_typed(cfg.balance.method, "balance.method", ChannelBalance)
    calib_sampler = sampler if cfg.calib.sampler is None else check_sampler(cfg.calib.sampler, "calib.sampler", *facts)
    axes = {"model": cfg.model.name, "sampler": f"{sampler['name']}-{sampler['steps']}", "ops": ops.name,
            "bits": bits.name, "calib": cfg.calib.name, "metric": cfg.metric.name,
            "weight_metric": cfg.weight_metric.name, "recon": cfg.recon.name, "balance": cfg.balance.name}
    return PTQRecipe(PTQMethod(quant, search, reconstruction, balance), calibration, calib_sampler, axes,
                     quantize_decoder=ops.decoder)
