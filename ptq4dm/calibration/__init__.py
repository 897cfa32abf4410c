"""Calibration: which inputs (calibration sets) and how ranges are chosen from them (range search)."""

from ptq4dm.calibration.balance import ChannelBalance, balance_
from ptq4dm.calibration.calibset import (
    CalibrationRecipe,
    CalibrationSet,
    CalibrationSource,
    ForwardNoised,
    PureNoise,
    RawImages,
    ReferenceTrajectory,
    Trajectory,
    build_calibration_set,
)
from ptq4dm.calibration.range_metrics import (
    ByBitWidth,
    CosineDistance,
    KLDivergence,
    LpDistance,
    MinMax,
    PearsonDistance,
    Percentile,
    RangeMetric,
)
from ptq4dm.calibration.search import RangeChoice, RangeSearch, calibrate_
from ptq4dm.calibration.timesteps import (
    Gaussian,
    RandomSteps,
    ReferenceGaussian,
    ReferenceSingle,
    Single,
    TimestepDistribution,
    Uniform,
)

__all__ = ["ByBitWidth", "CalibrationRecipe", "CalibrationSet", "CalibrationSource", "ChannelBalance", "CosineDistance", "ForwardNoised", "Gaussian", "KLDivergence",
           "LpDistance", "MinMax", "PearsonDistance", "Percentile", "PureNoise", "RandomSteps", "RangeChoice",
           "RangeMetric", "RangeSearch", "RawImages", "ReferenceGaussian", "ReferenceSingle",
           "ReferenceTrajectory", "Single", "TimestepDistribution", "Trajectory", "Uniform",
           "balance_", "build_calibration_set", "calibrate_"]
