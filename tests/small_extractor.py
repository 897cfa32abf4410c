"""A small deterministic feature extractor with torch-fidelity's interface, for fast metric tests."""

from __future__ import annotations

import torch
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from ptq4dm.metrics.inception import FIDInceptionV3

NAME = "ptq4dm-test-small"


class SmallExtractor(FIDInceptionV3):
    """The FID Inception's interface (feature names, metric layers) over two random convolutions."""

    def __init__(self, name, features_list, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)  # not FIDInceptionV3's: no network file
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, x):
        x = (x.float() - 128) / 128
        h = torch.relu(self.conv1(x))
        spatial = h[:, :2, ::4, ::4].flatten(1)  # few dimensions, so 200 images estimate their covariance
        pooled = torch.relu(self.conv2(h)).mean((2, 3))
        out = {"2048": pooled, "spatial": spatial}
        return tuple(out[n] for n in self.features_list)


def register_small_extractor():
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, SmallExtractor)
    return create_feature_extractor(NAME, ["2048", "spatial"], cuda=False, verbose=False)
