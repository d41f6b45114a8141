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
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


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


# Generated samples per mode evaluation in VEEGAN's and PacGAN's protocol (whatever evaluation.n is).
MODE_SAMPLES = 2500


def mode_metrics(samples: Tensor, means: Tensor, std: float, strict_min: int = 20) -> dict[str, float]:
    """Mode coverage on a 2-D mixture, by the rule of VEEGAN (Srivastava et al. 2017) and PacGAN (Lin et al. 2018).

    Their protocol draws ``MODE_SAMPLES`` = 2,500 samples. A sample is high quality
    when it lies within 3σ of its nearest mode centre; ``modes_covered`` counts the
    modes nearest to at least one high-quality sample (the published rule);
    ``modes_covered_20`` the modes nearest to at least ``strict_min`` = 20 (a
    stricter rule, the only one targetgen reported before). ``mode_kl_to_uniform``
    is PacGAN's reverse KL, KL(p ‖ uniform) = log K − H(p) of the histogram p of
    high-quality samples over the K modes (PacGAN's code logs its entropy H(p)):
    0 for a balanced generator, finite, and NaN when no sample is high quality.
    """
    distance = torch.cdist(samples.double(), means.double())
    nearest, mode = distance.min(dim=1)
    high_quality = nearest <= 3 * std
    counts = torch.bincount(mode[high_quality], minlength=len(means)).double()
    return {
        "modes_covered": float((counts >= 1).sum().item()),
        "modes_covered_20": float((counts >= strict_min).sum().item()),
        "modes_total": float(len(means)),
        "high_quality_share": high_quality.double().mean().item(),
        "mode_kl_to_uniform": kl_to_uniform(counts) if high_quality.any() else math.nan,
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
