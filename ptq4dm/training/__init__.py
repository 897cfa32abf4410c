from ptq4dm.training.datamodule import DeviceResidentImages
from ptq4dm.training.module import DiffusionTraining

__all__ = ["DeviceResidentImages", "DiffusionTraining"]
