"""Metrics on feature vectors, each tested against a case with a known answer.

* Fréchet distance (FID in Inception space): pytorch-fid's own
  ``calculate_frechet_distance`` on (mean, covariance) statistics;
* KID (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial kernel,
  mean and standard deviation over random subsets;
* precision / recall (Kynkäänniemi et al. 2019, k = 3) and density / coverage
  (Naeem et al. 2020, k = 5), equal to the reference implementation ``prdc``;
* toy2d mode metrics and the class histogram of a classifying feature space.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


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
    from pytorch_fid.fid_score import calculate_frechet_distance  # here: it imports torchvision, seconds

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
            "reliable and compares only with FIDs computed on the same samples",
            stacklevel=2,
        )
    return value


# ----------------------------------------------------------------------------- KID


KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def kernel_inception_distance(
    real: Tensor, fake: Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """KID: the unbiased estimate of MMD² with k(x, y) = (xᵀy/d + 1)³, averaged over ``subsets``
    random subsets of min(``subset_size``, n) real and as many generated vectors; returns
    (mean, standard deviation over subsets), as Bińkowski et al.'s and torch-fidelity's code.

    Within-set sums leave out k(x, x) (their expectation differs); the cross term uses all pairs, as
    every pair there is independent. Subsets come from a generator seeded with ``seed``, never from
    the global (training) RNG.
    """
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
    real, fake = real.double().reshape(len(real), -1), fake.double().reshape(len(fake), -1)
    dim = real.size(1)
    one = torch.ones((), dtype=torch.float64)
    kernel = lambda a, b: torch.addmm(one, a, b.T, alpha=1 / dim).pow_(3)  # noqa: E731 - in place: ~1.5× faster
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(subsets):
        x = fake[torch.randperm(len(fake), generator=generator)[:size]]
        y = real[torch.randperm(len(real), generator=generator)[:size]]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (size * (size - 1))
        estimates.append(within - 2 * k_xy.mean())
    values = torch.stack(estimates)
    return values.mean().item(), values.std(correction=0).item()


# ----------------------------------------------------------------------------- precision / recall

PRECISION_RECALL_K = 3  # Kynkäänniemi et al. 2019
DENSITY_COVERAGE_K = 5  # Naeem et al. 2020's recommendation
DISTANCE_CHUNK_BYTES = 64 * 1024**2  # one block of the distance matrix at a time


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances in float64, each computed from the difference of its two vectors.

    Not by ‖a‖² + ‖b‖² − 2a·b: that loses the distances under a large common
    offset, and its rounding depends on where a vector sits in the matrix, so
    equal distances (copied samples, k-th neighbours) would not compare equal.
    """
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def _row_blocks(rows: Tensor, columns: int) -> tuple[Tensor, ...]:
    """``rows`` in blocks whose distance matrices to ``columns`` points fit DISTANCE_CHUNK_BYTES."""
    return rows.split(max(1, DISTANCE_CHUNK_BYTES // (8 * max(columns, 1))))


def kth_neighbour_radii(x: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """For each k, every point's distance to its k-th nearest point of ``x`` other than itself.

    As in prdc: the (k+1)-th smallest distance of the row, the point itself
    (at 0) first, so a duplicate of a point counts as one of its neighbours.
    """
    radii: dict[int, list[Tensor]] = {k: [] for k in ks}
    for block in _row_blocks(x, len(x)):
        smallest = pairwise_distances(block, x).topk(max(ks) + 1, dim=1, largest=False).values  # ascending
        for k in ks:
            radii[k].append(smallest[:, k])
    return {k: torch.cat(parts) for k, parts in radii.items()}


def precision_recall_density_coverage(real: Tensor, fake: Tensor, k: int | None = None) -> dict[str, float]:
    """The four k-NN manifold metrics, equal to ``prdc.compute_prdc``. Inputs: N×d feature vectors.

    Precision and recall use k = ``k`` or, when None, Kynkäänniemi et al.'s k = 3;
    density and coverage use k = ``k`` or, when None, Naeem et al.'s recommended
    k = 5. A point lies in a ball when its distance is strictly less than the
    radius (prdc's ``<``); radii and memberships come from the same float64
    distances, computed a block of rows at a time.
    """
    k_pr = PRECISION_RECALL_K if k is None else k
    k_dc = DENSITY_COVERAGE_K if k is None else k
    real, fake = real.reshape(len(real), -1), fake.reshape(len(fake), -1)
    needed = max(k_pr, k_dc)
    if min(len(real), len(fake)) <= needed:
        raise ValueError(
            f"precision/recall/density/coverage with k = {needed} need more than {needed} real "
            f"and generated samples, got {len(real)} and {len(fake)}"
        )
    real_radii = kth_neighbour_radii(real, (k_pr, k_dc))
    fake_radii = kth_neighbour_radii(fake, (k_pr,))[k_pr]
    in_real_pr = torch.zeros(len(fake), dtype=torch.long)  # per generated sample: real balls (k_pr) containing it
    in_real_dc = torch.zeros(len(fake), dtype=torch.long)  # the same with the density/coverage radii
    recalled, covered = [], []
    start = 0
    for block in _row_blocks(real, len(fake)):
        distance = pairwise_distances(block, fake)  # block of real × all generated
        r_pr = real_radii[k_pr][start : start + len(block)].unsqueeze(1)
        r_dc = real_radii[k_dc][start : start + len(block)]
        in_real_pr += (distance < r_pr).sum(dim=0)
        in_real_dc += (distance < r_dc.unsqueeze(1)).sum(dim=0)
        recalled.append((distance < fake_radii.unsqueeze(0)).any(dim=1))
        covered.append(distance.min(dim=1).values < r_dc)
        start += len(block)
    return {
        "precision": (in_real_pr > 0).double().mean().item(),
        "recall": torch.cat(recalled).double().mean().item(),
        "density": (1.0 / k_dc) * (in_real_dc.sum().item() / len(fake)),  # prdc's order of operations
        "coverage": torch.cat(covered).double().mean().item(),
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
    """KL(p ‖ uniform) of a histogram; inf when it is empty (null in JSON files: ``jsonsafe``)."""
    total = counts.sum()
    if total == 0:
        return math.inf
    p = counts / total
    p = p[p > 0]
    return (p * (p * len(counts)).log()).sum().item()


def class_metrics(probabilities: Tensor, min_share: float = 0.02) -> dict[str, float]:
    """A classifier's view of generated samples (N×classes probabilities): which classes, how balanced, how sure."""
    classes = probabilities.argmax(dim=1)
    counts = torch.bincount(classes, minlength=probabilities.size(1)).double()
    share = counts / counts.sum()
    return {
        "classes_covered": float((share >= min_share).sum().item()),
        "class_kl_to_uniform": kl_to_uniform(counts),
        "mean_confidence": probabilities.max(dim=1).values.double().mean().item(),
        **{f"class_{c}_share": share[c].item() for c in range(len(share))},
    }
