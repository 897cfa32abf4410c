"""Reconstruction after the range search (recon/ config group): learned weight rounding and step sizes, unit
by unit in execution order. See methods.py."""

from ptq4dm.reconstruction.methods import (
    BlockReconstruction,
    LayerReconstruction,
    QDropReconstruction,
    Reconstruction,
    ReconstructionContext,
    UnitReconstruction,
    UnitReport,
)
from ptq4dm.reconstruction.two_stage import TwoStageReconstruction
from ptq4dm.reconstruction.units import BLOCK_TYPES, Unit, find_units

__all__ = ["BLOCK_TYPES", "BlockReconstruction", "LayerReconstruction", "QDropReconstruction", "Reconstruction",
           "ReconstructionContext", "TwoStageReconstruction", "Unit", "UnitReconstruction", "UnitReport", "find_units"]
