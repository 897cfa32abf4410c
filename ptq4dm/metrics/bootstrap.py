"""How much of a FID difference is the choice of images: a paired bootstrap over the generated images.

Quantized and full-precision images are paired: image i of both sets starts from the same noise. Resampling
the pairs (the same indices for both sets) and recomputing FID(quantized) - FID(FP) against the same reference
statistics gives the spread of that difference over draws of the evaluation noise, with everything the two sets
share cancelling. It does not include the spread over calibration seeds, which only repeated calibrations show.

Every replicate is computed in float64 on the features' device: the means, the covariance, and
tr sqrt(S_ref S) from the eigenvalues of the symmetric R S R (R the reference's symmetric square root, taken once),
or of F S_ref F^T for a set with fewer images than dimensions (S = F^T F from its centred features).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _frechet(x: torch.Tensor, mu_ref: torch.Tensor, sigma_ref: torch.Tensor, root_ref: torch.Tensor) -> torch.Tensor:
    """FID of the feature rows ``x`` against Gaussian reference statistics: ``fidelity.frechet_distance``'s
    formula in torch (so that replicates run on the metrics device), checked against it by a test."""
    n, d = x.shape
    mu = x.mean(0)
    f = (x - mu) / math.sqrt(n - 1)  # sigma = f^T f
    m = f @ sigma_ref @ f.T if n < d else root_ref @ (f.T @ f) @ root_ref
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    return (mu - mu_ref).pow(2).sum() + sigma_ref.trace() + f.pow(2).sum() - 2 * eig.sqrt().sum()


@torch.no_grad()
def paired_fid_difference(a: torch.Tensor, b: torch.Tensor, reference: dict[str, np.ndarray], replicates: int,
                          seed: int = 0, progress: bool = False) -> dict[str, float | int]:
    """Bootstrap spread of FID(a) - FID(b) against ``reference`` ({"mu", "sigma"}): ``a`` and ``b`` are the
    features (N, D) of two image sets whose row i came from the same noise. Returns the standard error (the
    replicates' standard deviation) and the number of replicates. No percentile interval: resampling with
    replacement repeats images, which raises every replicate's FID, so the replicates are not centred on the
    difference itself; their spread is what carries over."""
    if a.shape != b.shape:
        raise ValueError(f"paired features need the same shape: {tuple(a.shape)} and {tuple(b.shape)}")
    if replicates < 2 or len(a) < 2:
        raise ValueError(f"a bootstrap needs 2 or more replicates and images: {replicates} and {len(a)}")
    device = a.device
    a, b = a.double(), b.to(device, torch.float64)
    mu_ref = torch.as_tensor(reference["mu"], dtype=torch.float64, device=device)
    sigma_ref = torch.as_tensor(reference["sigma"], dtype=torch.float64, device=device)
    root_ref = _sqrt_psd(sigma_ref) if len(a) >= a.shape[1] else None
    generator = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in tqdm(range(replicates), desc="FID bootstrap", disable=not progress, leave=False):
        idx = torch.randint(len(a), (len(a),), generator=generator).to(device)
        diffs.append(float(_frechet(a[idx], mu_ref, sigma_ref, root_ref) - _frechet(b[idx], mu_ref, sigma_ref,
                                                                                    root_ref)))
    return {"se": float(np.std(diffs, ddof=1)), "replicates": replicates}
