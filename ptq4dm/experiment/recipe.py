"""From the config groups (ops, bits, calib, metric, sampler) to the objects a job runs with.

Everything here is cheap and runs before any model is loaded, so a bad value stops the job at once with a
message naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ptq4dm.calibration import CalibrationRecipe, CalibrationSource, RangeMetric, RangeSearch, TimestepDistribution
from ptq4dm.diffusion.sampler import SAMPLERS
from ptq4dm.quant import QuantConfig

AXES = ("model", "sampler", "ops", "bits", "calib", "metric")


@dataclass
class PTQRecipe:
    quant: QuantConfig
    calibration: CalibrationRecipe
    search: RangeSearch
    calib_sampler: dict  # the sampler the calibration trajectories follow
    axes: dict[str, str]  # the choice on each axis, for tables and W&B group-by
    quantize_decoder: bool = False  # a latent model's VAE decoder too (ops.decoder; QuantConfig.for_decoder)


def _instantiate(node: DictConfig, key: str, kind: type):
    try:
        obj = instantiate(node)
    except InstantiationException as err:  # unwrap the constructor's own message, which names the key
        cause = err.__cause__ or err
        raise ValueError(f"{key}: {cause}") from err
    if not isinstance(obj, kind):
        raise ValueError(f"{key}._target_={node.get('_target_')!r} is not a {kind.__name__}")
    return obj


def check_sampler(sampler: DictConfig | dict, key: str, num_train_timesteps: int = 1000) -> dict:
    sampler = OmegaConf.to_container(sampler) if isinstance(sampler, DictConfig) else dict(sampler)
    if sampler.get("name") not in SAMPLERS:
        raise ValueError(f"{key}.name={sampler.get('name')!r}: allowed are {sorted(SAMPLERS)}")
    steps = sampler.get("steps")
    if not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"{key}.steps={steps!r}: allowed is a whole number from 1 to {num_train_timesteps} "
                         "(the model's training steps)")
    return sampler


def check_sampler_outputs(outputs: tuple[str, ...], sampler: dict) -> None:
    """Sampler-output quantization needs a DDPM/DDIM step, and a variance only exists in a stochastic one."""
    if not outputs:
        return
    if sampler["name"] not in ("ddim", "ddpm"):
        raise ValueError(f"ops.sampler_outputs={list(outputs)} needs sampler ddim or ddpm, not {sampler['name']!r}")
    if "variance" in outputs and sampler["name"] == "ddim" and not sampler.get("eta", 0) > 0:
        raise ValueError(f"ops.sampler_outputs includes variance, but sampler=ddim with sampler.eta="
                         f"{sampler.get('eta', 0)} adds no noise: use sampler=ddpm or sampler.eta > 0")


def _check_types(node: DictConfig, group: str, types: dict[str, type | tuple]) -> None:
    for key, kind in types.items():
        value = node.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{group}.{key}={value!r}: allowed is a {names}".replace("NoneType", "null"))


def recipe_from_config(cfg: DictConfig) -> PTQRecipe:
    """Every axis checked for types and ranges, then turned into the objects a job runs with."""
    ops, bits = cfg.ops, cfg.bits
    _check_types(ops, "ops", {"conv": bool, "linear": bool, "attn_matmul": bool, "shortcut_split": bool,
                              "network_input": bool, "decoder": bool,
                              "first_last_bits": (int, type(None))})
    _check_types(bits, "bits", {"weight_symmetric": bool, "weight_per_channel": bool, "act_symmetric": bool})
    _check_types(cfg.metric, "metric", {"num_candidates": int, "weights": bool, "max_values": int,
                                        "independent_ends": bool})
    _check_types(cfg.calib, "calib", {"num_samples": int, "batch_size": int, "seed": int})
    _check_types(cfg.eval, "eval", {"num_samples": int, "batch_size": int, "compile": bool})
    T = cfg.model.scheduler.num_train_timesteps
    sampler = check_sampler(cfg.sampler, "sampler", T)
    for key in ("weight", "act"):
        value = bits[key]
        if value is not None and (not isinstance(value, int) or not 2 <= value <= 16):
            raise ValueError(f"bits.{key}={value!r}: allowed are whole numbers from 2 to 16, or null (full precision)")
    quant = QuantConfig(
        weight_bits=bits.weight, act_bits=bits.act, weight_symmetric=bits.weight_symmetric,
        weight_per_channel=bits.weight_per_channel, act_symmetric=bits.act_symmetric, conv=ops.conv,
        linear=ops.linear, attn_matmul=ops.attn_matmul, first_last_bits=ops.first_last_bits,
        network_input=ops.network_input, shortcut_split=ops.shortcut_split, exclude=tuple(ops.exclude), sampler_outputs=tuple(ops.sampler_outputs))
    check_sampler_outputs(quant.sampler_outputs, sampler)
    calibration = CalibrationRecipe(
        timesteps=_instantiate(cfg.calib.timesteps, "calib.timesteps", TimestepDistribution),
        source=_instantiate(cfg.calib.source, "calib.source", CalibrationSource),
        num_samples=cfg.calib.num_samples, batch_size=cfg.calib.batch_size, seed=cfg.calib.seed)
    if calibration.source.needs_images and cfg.data.name == "none":
        raise ValueError(f"calib={cfg.calib.name} draws real images, but data=none: choose a data set (data=cifar10)")
    search = RangeSearch(metric=_instantiate(cfg.metric.fn, "metric.fn", RangeMetric),
                         num_candidates=cfg.metric.num_candidates, weights=cfg.metric.weights,
                         max_values=cfg.metric.max_values, independent_ends=cfg.metric.independent_ends)
    calib_sampler = check_sampler(cfg.calib.sampler, "calib.sampler", T) if cfg.calib.sampler else sampler
    axes = {"model": cfg.model.name, "sampler": f"{sampler['name']}-{sampler['steps']}", "ops": ops.name,
            "bits": bits.name, "calib": cfg.calib.name, "metric": cfg.metric.name}
    return PTQRecipe(quant, calibration, search, calib_sampler, axes, quantize_decoder=ops.decoder)
