"""Structured configs (Hydra's ConfigStore): the types and allowed values of the run and evaluate configs.

Hydra checks types and choices when it composes a config, before any job starts, and names the key:
``seed=x`` -> "Value 'x' of type 'str' could not be converted to Integer, full_key: seed";
``eval.precision=fp8`` -> "Invalid value 'fp8', expected one of [fp32, bf16, fp16], full_key: eval.precision".
Ranges, which Hydra cannot state, are checked in each dataclass's ``__post_init__``, run when the entry point
turns a node into its object (``OmegaConf.to_object``) before anything is loaded. ``model``, ``logger`` and
``trainer`` stay open dicts: their keys depend on the chosen preset (and the trainer's are Lightning's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Precision(str, Enum):
    """Autocast dtype of the network on CUDA (the CPU always computes in float32)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    def __str__(self) -> str:
        return self.value


def _at_least(key: str, value, low, what: str = "a whole number") -> None:
    if value < low:
        raise ValueError(f"{key}={value!r}: allowed is {what} of {low} or more")


@dataclass
class EvalConfig:
    num_samples: int = 64
    batch_size: int = 64  # images per prediction batch (per device)
    precision: Precision = Precision.bf16
    compile: bool = False
    grid_size: int = 64

    def __post_init__(self):
        _at_least("eval.num_samples", self.num_samples, 1)
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.grid_size", self.grid_size, 1)


@dataclass
class ReferenceConfig:
    split: str = "train"
    max_features: int = 10000
    cache_dir: Optional[str] = None

    def __post_init__(self):
        if self.split not in ("train", "test"):
            raise ValueError(f"metrics.reference.split={self.split!r}: allowed are 'train' and 'test'")
        _at_least("metrics.reference.max_features", self.max_features, 1)


@dataclass
class MetricsConfig:
    inception_path: Optional[str] = None
    batch_size: int = 200
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    isc_weights_path: Optional[str] = None
    fid_bootstrap: int = 100  # replicates of the paired bootstrap of FID over FP (its standard error); 0: off
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self):
        _at_least("metrics.batch_size", self.batch_size, 1)
        if self.fid_bootstrap == 1 or self.fid_bootstrap < 0:
            raise ValueError(f"metrics.fid_bootstrap={self.fid_bootstrap!r}: allowed is 0 (off) or a whole number "
                             "of 2 or more (bootstrap replicates)")
        _at_least("metrics.kid_subset_size", self.kid_subset_size, 2)
        _at_least("metrics.kid_subsets", self.kid_subsets, 1)


@dataclass
class SamplerConfig:
    name: str = "ddim"
    steps: int = 100
    eta: float = 0.0  # DDIM's stochasticity (0: deterministic, 1: DDPM-like); unused by the other samplers;
    # its range, and steps against the model's T, are checked by recipe.check_sampler


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None
    format: str = "auto"
    split: str = "train"
    limit: Optional[int] = None
    cache_dir: Optional[str] = None


@dataclass
class BitsConfig:
    name: str = MISSING
    weight: Optional[int] = 8
    act: Optional[int] = 8
    weight_symmetric: bool = False
    weight_per_channel: bool = True
    act_symmetric: bool = False


@dataclass
class OpsConfig:
    name: str = MISSING
    conv: bool = True
    linear: bool = True
    attn_matmul: bool = False
    first_last_bits: Optional[int] = 8
    network_input: bool = False
    shortcut_split: bool = False
    exclude: List[str] = field(default_factory=list)
    sampler_outputs: List[str] = field(default_factory=list)
    decoder: bool = False
    act_placement: str = "input"
    edge_rule: str = "executed"
    attention_projections: bool = True
    symmetric: Optional[bool] = None
    act_range_ema: Optional[float] = None


@dataclass
class MetricConfig:
    name: str = MISSING
    fn: Any = MISSING  # {_target_: a RangeMetric subclass, its arguments}
    num_candidates: int = 100
    max_values: int = 65536
    independent_ends: bool = True


@dataclass
class WeightMetricConfig:
    name: str = MISSING
    fn: Any = MISSING  # {_target_: a RangeMetric subclass, its arguments}


@dataclass
class ReconConfig:
    name: str = MISSING
    method: Any = None  # {_target_: a Reconstruction subclass, its arguments}; null: none


@dataclass
class BalanceConfig:
    name: str = MISSING
    method: Any = None  # {_target_: ptq4dm.calibration.ChannelBalance, its arguments}; null: none


@dataclass
class RecipePresetConfig:
    """What a recipe/ preset (a measured best combination of the axes) states of itself: its name and the axis
    presets it chooses, e.g. {bits: w4a8, recon: qdrop} (ptq4dm.run refuses another choice on those axes beside it:
    the preset's own keys, such as recon.method.iters, would land on that choice)."""

    name: str = MISSING
    axes: Dict[str, str] = field(default_factory=dict)


@dataclass
class CalibConfig:
    name: str = MISSING
    source: Any = MISSING  # {_target_: a CalibrationSource subclass, its arguments}
    timesteps: Any = MISSING  # {_target_: a TimestepDistribution subclass, its arguments}
    num_samples: int = 1024
    batch_size: int = 256
    seed: int = 1234
    sampler: Optional[Any] = None  # a sampler node ({name, steps, eta}; checked by recipe.check_sampler), or null


@dataclass
class RunConfig:
    model: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    bits: BitsConfig = field(default_factory=BitsConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    weight_metric: WeightMetricConfig = field(default_factory=WeightMetricConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    recipe: Optional[RecipePresetConfig] = None  # a recipe/ preset; null: the axes as chosen one by one
    data: DataConfig = field(default_factory=DataConfig)
    logger: Any = None
    trainer: Any = MISSING
    seed: int = 0
    output_dir: str = MISSING
    fp_cache_dir: Optional[str] = None
    progress: bool = True
    force: bool = False
    stop_after: Optional[str] = None  # null | calibration | samples (checked by ptq4dm.run.checked_recipe)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass
class EvaluateConfig:
    model: Any = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: Any = MISSING
    seed: int = 0
    quantized: Optional[str] = None
    output_dir: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def register() -> None:
    """Make ``run_schema`` and ``evaluate_schema`` known to Hydra (the first entry of conf/run.yaml's and
    conf/evaluate.yaml's defaults lists)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
