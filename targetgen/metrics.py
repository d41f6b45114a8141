"""Metrics on feature vectors, each tested against a case with a known answer.

* Fréchet distance (FID in Inception space): pytorch-fid's own
  ``calculate_frechet_distance`` on (mean, covariance) statistics;
* precision / recall (Kynkäänniemi et al. 2019) and density / coverage
  (Naeem et al. 2020), k = 3, radii from exact k-NN;
* toy2d mode metrics and the digits class histogram.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .search import knn


@dataclass
class Statistics:
    mu: np.ndarray  # d
    sigma: np.ndarray  # d×d
    n: int


def feature_statistics(features: Tensor) -> Statistics:
    x = features.double().cpu().numpy()
    n, d = x.shape
    if n <= d:
        warnings.warn(
            f"{n} samples for {d}-dimensional features: the covariance is singular (rank < {d}); "
            f"FID is then biased and unstable. Use more than {d} samples (the paper: 2048).",
            stacklevel=2,
        )
    return Statistics(x.mean(axis=0), np.cov(x, rowvar=False), n)


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """pytorch-fid's Fréchet distance; what it prints or warns about a singular covariance product
    becomes one warning that says what it means for the number."""
    import contextlib
    import io

    from pytorch_fid.fid_score import calculate_frechet_distance

    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        try:
            value = float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
        except ValueError as err:  # "Imaginary component": sqrtm failed outright
            value = math.nan
            printed.write(str(err))
    singular = printed.getvalue() or any("singular" in str(w.message).lower() for w in caught)
    if singular:
        warnings.warn(
            "FID: the product of the two feature covariances is singular (some features never vary, or there are "
            f"fewer samples than dimensions), so its matrix square root is approximate: the FID ({value:.4g}) is less "
            "reliable and compares only with FIDs computed on the same samples", stacklevel=2)
    return value


# ----------------------------------------------------------------------------- precision / recall


def _kth_neighbour_sq_radii(x: Tensor, k: int) -> Tensor:
    """Squared distance of every point to its k-th nearest other point."""
    d, _ = knn(x, x, k + 1)  # the first neighbour is the point itself
    return d[:, k].double()


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a.double(), b.double()).pow(2)


def _count_within(points: Tensor, centres: Tensor, sq_radii: Tensor, chunk: int = 1024) -> Tensor:
    """For every point, how many balls (centre, radius) contain it; chunked over points."""
    counts = [(_sq_distances(part, centres) <= sq_radii.unsqueeze(0)).sum(dim=1) for part in points.split(chunk)]
    return torch.cat(counts)


def precision_recall_density_coverage(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """The four manifold metrics with k-NN balls. Inputs: N×d feature vectors."""
    real, fake = real.float().reshape(len(real), -1), fake.float().reshape(len(fake), -1)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} real and generated samples")
    real_radii = _kth_neighbour_sq_radii(real, k)
    fake_radii = _kth_neighbour_sq_radii(fake, k)
    fake_in_real = _count_within(fake, real, real_radii)  # per generated sample: real balls containing it
    real_in_fake = _count_within(real, fake, fake_radii)
    nearest_fake, _ = knn(real, fake, 1)
    return {
        "precision": (fake_in_real > 0).double().mean().item(),
        "recall": (real_in_fake > 0).double().mean().item(),
        "density": fake_in_real.double().sum().item() / (k * len(fake)),
        "coverage": (nearest_fake[:, 0].double() <= real_radii).double().mean().item(),
    }


# ----------------------------------------------------------------------------- toy2d and digits


def mode_metrics(samples: Tensor, means: Tensor, std: float, min_samples: int = 20) -> dict[str, float]:
    """Mode coverage on a 2-D mixture (the VEEGAN / PacGAN protocol).

    A sample is high quality when it lies within 3σ of its nearest mode; a
    mode is covered when at least ``min_samples`` high-quality samples are
    nearest to it. The KL divergence of the histogram of high-quality samples
    over modes to uniform is 0 for a perfectly balanced generator.
    """
    distance = torch.cdist(samples.double(), means.double())
    nearest, mode = distance.min(dim=1)
    high_quality = nearest <= 3 * std
    counts = torch.bincount(mode[high_quality], minlength=len(means)).double()
    return {
        "modes_covered": float((counts >= min_samples).sum().item()),
        "modes_total": float(len(means)),
        "high_quality_share": high_quality.double().mean().item(),
        "mode_kl_to_uniform": kl_to_uniform(counts),
    }


def kl_to_uniform(counts: Tensor) -> float:
    """KL(p ‖ uniform) of a histogram; inf when it is empty."""
    total = counts.sum()
    if total == 0:
        return math.inf
    p = counts / total
    p = p[p > 0]
    return (p * (p * len(counts)).log()).sum().item()


def class_metrics(probabilities: Tensor, min_share: float = 0.02) -> dict[str, float]:
    """The digits classifier's view of generated samples: which classes, how balanced, how sure."""
    classes = probabilities.argmax(dim=1)
    counts = torch.bincount(classes, minlength=probabilities.size(1)).double()
    share = counts / counts.sum()
    return {
        "classes_covered": float((share >= min_share).sum().item()),
        "class_kl_to_uniform": kl_to_uniform(counts),
        "mean_confidence": probabilities.max(dim=1).values.double().mean().item(),
        **{f"class_{c}_share": share[c].item() for c in range(len(share))},
    }
