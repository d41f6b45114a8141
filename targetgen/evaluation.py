"""Evaluate a generator: FID and KID, precision/recall, density/coverage, modes, digit classes.

The paper's protocol by default: 2048 generated samples against 2048 real
images drawn at random (all of them when there are fewer), both with a fixed
seed. Real statistics are cached per (data set fingerprint, feature space and
its weights, N, image size); a cache file whose recorded key differs from the
one asked for is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import registry
from .config import Config, DataConfig, EvaluationConfig
from .data import ImageFiles, IndexedDataset, TensorImages, TrainingData, iterate_batches, mixture_means, mixture_std
from .errors import ConfigError
from .features import find_fid_weights
from .files import atomic_write
from .metrics import (
    DENSITY_COVERAGE_K,
    MODE_SAMPLES,
    PRECISION_RECALL_K,
    Statistics,
    class_metrics,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mode_metrics,
    precision_recall_density_coverage,
)
from .samples import generate

METRICS = ("fid", "pr", "modes", "classes")
# The feature space that evaluation uses for a data source unless told otherwise; inception for the rest.
DOMAIN_FEATURES = {"digits": "digits", "mnist5k": "mnist", "toy2d": "pixels"}
# Why a metric can have no value; it is then null in the JSON files (``jsonsafe``) and n/a in tables.
NO_VALUE_BECAUSE = {"mode_kl_to_uniform": "no high-quality samples", "class_kl_to_uniform": "no samples"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "targetgen"


def resolve_features(evaluation: EvaluationConfig, data: DataConfig) -> str:
    if evaluation.features != "auto":
        return evaluation.features
    return DOMAIN_FEATURES.get(data.name, "inception")


def can_classify(features: str) -> bool:
    """Whether the feature space ``features`` has a classifier (``classify``) for the class metrics."""
    return hasattr(registry.load("features", features), "classify")


def resolve_metrics(evaluation: EvaluationConfig, data: DataConfig, features: str) -> list[str]:
    if evaluation.metrics == "auto":
        chosen = (
            ["fid", "pr"]
            + (["modes"] if data.name == "toy2d" else [])
            + (["classes"] if can_classify(features) else [])
        )
    else:
        chosen = [m.strip() for m in evaluation.metrics.split(",") if m.strip()]
    for metric in chosen:
        if metric not in METRICS:
            raise ConfigError(f"evaluation.metrics: unknown metric {metric!r}; expected some of {', '.join(METRICS)}")
    if "modes" in chosen and data.name != "toy2d":
        raise ConfigError(
            "evaluation.metrics: 'modes' counts the modes of a toy2d mixture; these data are " + data.name
        )
    if "classes" in chosen and not can_classify(features):
        raise ConfigError(
            f"evaluation.metrics: 'classes' needs a feature space that classifies (digits, mnist), "
            f"got features {features!r}"
        )
    if "pr" in chosen:
        needed = evaluation.k or max(PRECISION_RECALL_K, DENSITY_COVERAGE_K)
        if evaluation.n <= needed:
            raise ConfigError(
                f"evaluation.n: precision/recall/density/coverage with k = {needed} need more than "
                f"{needed} samples, got {evaluation.n}"
            )
    return chosen


def describe_value(metric: str, value: float | None) -> str:
    """A metric's value for a table, or why it has none (e.g. ``n/a (no high-quality samples)``)."""
    if value is None or not math.isfinite(value):
        return f"n/a ({NO_VALUE_BECAUSE.get(metric, 'not finite')})"
    return f"{value:.4g}"


def load_features(name: str, device: torch.device, fid_weights: str | None = None):
    cls = registry.load("features", name, "evaluation.features")
    return cls(device=device, weights=fid_weights) if name == "inception" and fid_weights else cls(device=device)


# ----------------------------------------------------------------------------- real data


def fingerprint(data: TrainingData, config: DataConfig) -> str:
    """Identifies the data set's content: its config, its size, and its bytes or file list."""
    h = hashlib.sha256()
    described = {k: v for k, v in asdict(config).items() if k not in ("num_workers", "download")}
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    h.update(str(len(data.dataset)).encode())
    dataset = data.dataset
    if isinstance(dataset, TensorImages):
        h.update(dataset.images.float().numpy().tobytes())
    elif isinstance(dataset, IndexedDataset) and isinstance(dataset.base, ImageFiles):
        for path in dataset.base.paths:
            h.update(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def real_subset(data: TrainingData, n: int, seed: int) -> Tensor:
    """``n`` real images drawn at random with ``seed`` (all of them when there are fewer)."""
    size = len(data.dataset)
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: min(n, size)]
    return torch.cat([batch.images for batch in iterate_batches(data.dataset, chosen, 256, 0, drop_last=False)])


@dataclass
class RealFeatures:
    features: Tensor
    statistics: Statistics


def real_features(data: TrainingData, config: DataConfig, extractor, evaluation: EvaluationConfig) -> RealFeatures:
    """Features and statistics of the real subset, from the cache when its key matches."""
    key = {
        "fingerprint": fingerprint(data, config),
        "features": extractor.name,
        "features_version": getattr(extractor, "version", "1"),
        "n": evaluation.n,
        "seed": evaluation.seed,
        "image_shape": list(data.image_shape),
    }
    shape = "x".join(map(str, data.image_shape))
    cache_dir = Path(evaluation.cache_dir).expanduser() if evaluation.cache_dir else default_cache_dir()
    path = cache_dir / f"{config.name}-{extractor.name}-n{evaluation.n}-{shape}-{key['fingerprint']}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                recorded = json.loads(str(stored["key"]))
                if recorded == key:
                    features = torch.from_numpy(stored["features"])
                    return RealFeatures(features, Statistics(stored["mu"], stored["sigma"], len(features)))
            warnings.warn(
                f"cached real statistics {path} were made for {recorded}, not {key}: recomputing", stacklevel=2
            )
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(f"cached real statistics {path} are unreadable ({err}): recomputing", stacklevel=2)
    features = extractor(real_subset(data, evaluation.n, evaluation.seed)).float()
    stats = feature_statistics(features)
    # written whole, then renamed (per process: parallel runs of a comparison may fill the same cache)
    atomic_write(
        path,
        lambda handle: np.savez(handle, key=json.dumps(key), features=features.numpy(), mu=stats.mu, sigma=stats.sigma),
        "cached real statistics",
    )
    return RealFeatures(features, stats)


# ----------------------------------------------------------------------------- generated data


def generated_samples(
    generator: nn.Module, latent_shape: tuple[int, ...], n: int, seed: int, device, bf16: bool = False
) -> Tensor:
    """``n`` samples from latents of their own seed: evaluation draws nothing from the training RNG. Generated
    as the run trains (bf16 autocast in a bf16 run); the metrics are computed in float32 or more."""
    latents = torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed + 7919))
    return generate(generator, latents.to(device), chunk=256, bf16=bf16).cpu()


def evaluate(run, evaluation: EvaluationConfig | None = None, ema: bool = False) -> dict[str, float]:
    """Every chosen metric for the generator of ``run`` (a built or loaded Run)."""
    config: Config = run.config
    evaluation = evaluation or config.evaluation
    if evaluation.n < 4:
        raise ConfigError(f"evaluation.n: expected at least 4 samples, got {evaluation.n}")
    features_name = resolve_features(evaluation, config.data)
    chosen = resolve_metrics(evaluation, config.data, features_name)
    generator = run.generator
    if ema:
        generator = run.strategy.sampling_generator()
        if generator is run.generator:
            raise ConfigError("--ema: this run keeps no EMA generator (set regression.ema when training)")
    bf16 = run.config.train.precision == "bf16"
    samples = generated_samples(
        generator, tuple(run.fixed_noise.shape[1:]), evaluation.n, evaluation.seed, run.device, bf16
    )
    results: dict[str, float] = {"n": float(evaluation.n)}
    if "modes" in chosen:  # VEEGAN's and PacGAN's protocol: 2,500 samples of their own, whatever n is
        drawn = generated_samples(
            generator, tuple(run.fixed_noise.shape[1:]), MODE_SAMPLES, evaluation.seed, run.device
        )
        results.update(mode_metrics(drawn, mixture_means(config.data), mixture_std(config.data)))
    if "fid" in chosen or "pr" in chosen or "classes" in chosen:
        extractor = load_features(features_name, run.device, evaluation.fid_weights)
        fake = extractor(samples).float()
        if "fid" in chosen or "pr" in chosen:
            real = real_features(run.data, config.data, extractor, evaluation)
            if "fid" in chosen:  # KID beside every FID, named alike: fid_digits, kid_digits, kid_digits_std
                suffix = "" if features_name == "inception" else f"_{features_name}"
                results[f"fid{suffix}"] = frechet_distance(feature_statistics(fake), real.statistics)
                kid, kid_std = kernel_inception_distance(real.features, fake, seed=evaluation.seed)
                results[f"kid{suffix}"], results[f"kid{suffix}_std"] = kid, kid_std
            if "pr" in chosen:
                results.update(precision_recall_density_coverage(real.features, fake, evaluation.k))
        if "classes" in chosen:
            results.update(class_metrics(extractor.classify(samples)))
    return results


def metric_names(evaluation: EvaluationConfig, data: DataConfig) -> list[str]:
    """The names ``evaluate`` reports for these settings (besides the per-class shares), e.g. to check
    ``train.best_metric`` before training."""
    features = resolve_features(evaluation, data)
    chosen = resolve_metrics(evaluation, data, features)
    suffix = "" if features == "inception" else f"_{features}"
    names = []
    if "fid" in chosen:
        names += [f"fid{suffix}", f"kid{suffix}", f"kid{suffix}_std"]
    if "pr" in chosen:
        names += ["precision", "recall", "density", "coverage"]
    if "modes" in chosen:
        names += ["modes_covered", "modes_covered_20", "high_quality_share", "mode_kl_to_uniform"]
    if "classes" in chosen:
        names += ["classes_covered", "class_kl_to_uniform", "mean_confidence"]
    return names


def check_evaluation(evaluation: EvaluationConfig, data: DataConfig, best_metric: str | None = None) -> None:
    """Fail at once, before anything is built or trained, on bad metrics, a ``train.best_metric`` that
    evaluation will not report, or missing FID weights."""
    features = resolve_features(evaluation, data)
    resolve_metrics(evaluation, data, features)
    if best_metric is not None:
        names = metric_names(evaluation, data)
        if best_metric not in names:
            import difflib

            close = difflib.get_close_matches(best_metric, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"train.best_metric: {best_metric!r} is not among the evaluated metrics{hint} "
                f"(expected one of {', '.join(names)})"
            )
    if features == "inception":
        find_fid_weights(evaluation.fid_weights)
