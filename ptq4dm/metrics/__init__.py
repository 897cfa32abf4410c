from ptq4dm.metrics.fidelity import ImageStatistics, compute_metrics, extract_features, make_extractor
from ptq4dm.metrics.inception import EXTRACTOR_NAME, FIDInceptionV3, register

__all__ = ["EXTRACTOR_NAME", "FIDInceptionV3", "ImageStatistics", "compute_metrics", "extract_features",
           "make_extractor", "register"]
