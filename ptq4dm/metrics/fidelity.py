"""Image-quality metrics from Inception features, computed by torch-fidelity's own metric functions.

Features of an image set are extracted once (``extract_features``) and every metric reads them: FID and sFID
from Gaussian statistics, KID and precision/recall from the features themselves. A reference set may be
statistics only (the shipped CIFAR-10 statistics), in which case KID and precision/recall against it are
reported as unavailable rather than estimated.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm.auto import tqdm

from ptq4dm.metrics.inception import EXTRACTOR_NAME, check_network_file, default_network_path, register

FID_LAYER, SPATIAL_LAYER = "2048", "spatial"


@dataclass
class ImageStatistics:
    """What the metrics need of one image set: Gaussian statistics per layer and, optionally, features."""

    name: str
    extractor: str
    num_images: int
    stats: dict[str, dict[str, np.ndarray]]  # layer -> {"mu", "sigma"}
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (N, D); may be a subset

    @classmethod
    def from_features(cls, name: str, extractor: str, features: dict[str, torch.Tensor]) -> "ImageStatistics":
        stats = {layer: fid_features_to_statistics(f.double()) for layer, f in features.items()}
        return cls(name, extractor, len(next(iter(features.values()))), stats, dict(features))

    def to_arrays(self, with_features: bool = False) -> dict[str, np.ndarray]:
        """Flat arrays for ``.npz``: covariances as float32 upper triangles (half the bytes, same numbers to 1e-7)."""
        out = {"name": np.array(self.name), "extractor": np.array(self.extractor),
               "num_images": np.array(self.num_images)}
        for layer, s in self.stats.items():
            iu = np.triu_indices(len(s["mu"]))
            out[f"mu_{layer}"] = s["mu"].astype(np.float64)
            out[f"sigma_triu_{layer}"] = s["sigma"][iu].astype(np.float32)
        if with_features:
            for layer, f in self.features.items():
                out[f"features_{layer}"] = f.half().numpy()
        return out

    @classmethod
    def from_arrays(cls, z) -> "ImageStatistics":
        stats, features = {}, {}
        for key in z.files:
            if key.startswith("mu_"):
                layer = key[3:]
                mu = z[key].astype(np.float64)
                sigma = np.zeros((len(mu), len(mu)))
                sigma[np.triu_indices(len(mu))] = z[f"sigma_triu_{layer}"]
                sigma = sigma + np.triu(sigma, 1).T
                stats[layer] = {"mu": mu, "sigma": sigma}
            elif key.startswith("features_"):
                features[key[len("features_"):]] = torch.from_numpy(z[key].astype(np.float32))
        return cls(str(z["name"]), str(z["extractor"]), int(z["num_images"]), stats, features)


def make_extractor(device: str | torch.device = "cpu", network_path: str | None = None,
                   layers: tuple[str, ...] = (FID_LAYER, SPATIAL_LAYER)):
    """The registered FID Inception extractor, built through torch-fidelity's own factory."""
    name = register()
    extractor = create_feature_extractor(name, list(layers), cuda=False, verbose=False,
                                         feature_extractor_weights_path=network_path)
    return extractor.to(device)


def inception_input(channels: int) -> str:
    """How images of ``channels`` channels reach Inception (recorded in results.json as ``inception_input``)."""
    return "1 channel repeated to 3" if channels == 1 else f"{channels} channels"


def as_inception_input(batch: torch.Tensor) -> torch.Tensor:
    """A one-channel (grayscale) uint8 batch with its channel repeated to the 3 that Inception takes; other
    batches as they are (the extractor checks them)."""
    return batch.expand(-1, 3, -1, -1) if batch.dim() == 4 and batch.shape[1] == 1 else batch


@torch.no_grad()
def extract_features(images: torch.Tensor | Dataset, extractor, batch_size: int = 200, progress: bool = True,
                     desc: str = "Inception features") -> dict[str, torch.Tensor]:
    """Features of uint8 images (a (N, 3, H, W) tensor or a Dataset of uint8 images), on the CPU in float32.
    One-channel images (N, 1, H, W) are scored as grayscale RGB: their channel repeated to 3."""
    dataset = TensorDataset(images) if torch.is_tensor(images) else images
    device = next(extractor.parameters(), torch.empty(0)).device
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in extractor.features_list}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        batch = batch[0] if isinstance(batch, (list, tuple)) else batch
        feats = extractor(as_inception_input(batch).to(device))
        for name, f in zip(extractor.features_list, feats):
            chunks[name].append(f.float().cpu())
    features = {name: torch.cat(c) for name, c in chunks.items()}
    for name, f in features.items():
        if not torch.isfinite(f).all():
            raise FloatingPointError(f"non-finite Inception features in layer {name!r}")
    return features


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below 0 from round-off count as 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _factor(stats: ImageStatistics, layer: str) -> np.ndarray | None:
    """F with sigma = F^T F from the set's own features when it has fewer images than dimensions (k x d), else
    None. Only when the features are all of the set's images: a reference keeps a subset."""
    f = stats.features.get(layer)
    d = len(stats.stats[layer]["mu"])
    if f is None or len(f) != stats.num_images or len(f) > d or len(f) < 2:
        return None
    x = f.double().numpy()
    return (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)


def frechet_distance(a: ImageStatistics, b: ImageStatistics, layer: str) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b): torch-fidelity's FID formula, computed
    without the general (non-symmetric) eigenvalue problem it solves. The eigenvalues of S_a S_b are those of the
    symmetric PSD matrix F S_b F^T for any factor S_a = F^T F: the centred features of a set with fewer images
    than dimensions (an n x n problem), or else the symmetric square root of S_a (cached on the statistics, as a
    reference meets many generated sets). Same value to round-off (a test compares), several times faster on a CPU.
    """
    sa, sb = a.stats[layer], b.stats[layer]
    for x, y in ((a, b), (b, a)):
        f = _factor(x, layer)
        if f is not None:
            m = f @ y.stats[layer]["sigma"] @ f.T
            break
    else:
        cache = a.__dict__.setdefault("_sqrt_sigma", {})
        if layer not in cache:
            cache[layer] = _sqrt_psd(sa["sigma"])
        r = cache[layer]
        m = r @ sb["sigma"] @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    diff = sa["mu"] - sb["mu"]
    return float(diff @ diff + np.trace(sa["sigma"]) + np.trace(sb["sigma"]) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def compute_metrics(generated: ImageStatistics, reference: ImageStatistics, kid_subset_size: int = 1000,
                    kid_subsets: int = 100, prc_neighborhood: int = 3, seed: int = 2020) -> dict[str, float | None]:
    """FID, sFID, KID and precision/recall of ``generated`` against ``reference`` (None where not computable)."""
    out: dict[str, float | None] = {}
    for metric, layer in (("fid", FID_LAYER), ("sfid", SPATIAL_LAYER)):
        if layer in generated.stats and layer in reference.stats:
            out[metric] = frechet_distance(reference, generated, layer)
        else:
            out[metric] = None
    g, r = generated.features.get(FID_LAYER), reference.features.get(FID_LAYER)
    if g is not None and r is not None:
        subset = min(kid_subset_size, len(g), len(r))
        kid = kid_features_to_metric(g, r, kid_subsets=kid_subsets, kid_subset_size=subset, verbose=False,
                                     rng_seed=seed, kid_kernel="poly", kid_kernel_poly_degree=3,
                                     kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
        out["kid"] = kid["kernel_inception_distance_mean"]
        out["kid_std"] = kid["kernel_inception_distance_std"]
        if len(g) > prc_neighborhood and len(r) > prc_neighborhood:
            prc = prc_features_to_metric(g, r, prc_neighborhood=prc_neighborhood, prc_batch_size=10000,
                                         save_cpu_ram=False, verbose=False)
            out["precision"], out["recall"] = prc["precision"], prc["recall"]
    else:
        out.update(kid=None, kid_std=None, precision=None, recall=None)
    for key, value in out.items():
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"metric {key} is {value}")
    return out


__all__ = ["EXTRACTOR_NAME", "ImageStatistics", "as_inception_input", "compute_metrics", "extract_features",
           "inception_input", "make_extractor"]


ISC_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for them in the hub cache


def inception_score_weights(path: str | None = None) -> str | None:
    """torch-fidelity's inception-v3-compat weights (they carry the classifier): ``path`` (which must exist) or,
    without one, torch-fidelity's copy in the torch hub cache if present; else None."""
    if path:
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"metrics.isc_weights_path={path!r}: no such file; allowed is torch-fidelity's "
                                    f"inception-v3-compat state dict ({ISC_WEIGHTS_FILE}) or null (no Inception Score)")
        return str(Path(path).expanduser())
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ISC_WEIGHTS_FILE
    return str(cached) if cached.is_file() else None


def read_isc_weights(path: str) -> dict[str, torch.Tensor]:
    """The Inception Score weights as plain tensors: read with ``weights_only=True``, so the file cannot run code
    (torch-fidelity itself would unpickle it in full)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file means: not these weights
        raise ValueError(f"metrics.isc_weights_path={path!r} is not a plain state dict of tensors ({err}); allowed "
                         f"is torch-fidelity's inception-v3-compat weights ({ISC_WEIGHTS_FILE})") from err
    if not (isinstance(state, dict) and "fc.weight" in state and all(torch.is_tensor(v) for v in state.values())):
        raise ValueError(f"metrics.isc_weights_path={path!r} holds no Inception classifier (fc.weight): allowed is "
                         f"torch-fidelity's inception-v3-compat weights ({ISC_WEIGHTS_FILE})")
    return state


def check_metric_files(inception_path: str | None, isc_weights_path: str | None) -> None:
    """The metric networks' files, checked before a job touches its folder or loads a model: the FID network by
    its sha1, the Inception Score weights by reading them safely (a wrong path or file fails here, not after the
    sampling)."""
    check_network_file(inception_path or default_network_path())
    path = inception_score_weights(isc_weights_path)
    if path is not None:
        read_isc_weights(path)


def inception_score(images: torch.Tensor, weights_path: str | None, device="cpu", batch_size: int = 200,
                    progress: bool = True) -> dict[str, float] | None:
    """Inception Score through torch-fidelity, or None when no weights with a classifier are available."""
    path = inception_score_weights(weights_path)
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity loads a path: hand it the tensors just read safely
        safe = Path(tmp) / ISC_WEIGHTS_FILE
        torch.save(read_isc_weights(path), safe)
        extractor = create_feature_extractor("inception-v3-compat", ["logits_unbiased"], cuda=False, verbose=False,
                                             feature_extractor_weights_path=str(safe)).to(device)
    logits = extract_features(images, extractor, batch_size, progress, desc="Inception Score")["logits_unbiased"]
    isc = isc_features_to_metric(logits, splits=10)
    return {"isc": isc["inception_score_mean"], "isc_std": isc["inception_score_std"]}
