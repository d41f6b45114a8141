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
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor, nn

from . import registry
from .config import Config, DataConfig, EvaluationConfig
from .data import (
    ImageFiles,
    IndexedDataset,
    TensorImages,
    TrainingData,
    iterate_batches,
    load_data,
    mixture_means,
    mixture_std,
)
from .discriminators import Logit
from .errors import ConfigError
from .features import find_fid_weights
from .files import atomic_write
from .metrics import (
    DENSITY_COVERAGE_K,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
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
from .refine import Cost, Refinement, refined_chunks
from .samples import generate, generate_chunks

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


def real_chunks(data: TrainingData, n: int, seed: int):
    """``n`` real images drawn at random with ``seed`` (all of them when there are fewer), 256 at a time."""
    size = len(data.dataset)
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: min(n, size)]
    return (batch.images for batch in iterate_batches(data.dataset, chosen, 256, 0, drop_last=False))


def real_subset(data: TrainingData, n: int, seed: int) -> Tensor:
    """The images of ``real_chunks``, whole."""
    return torch.cat(list(real_chunks(data, n, seed)))


@dataclass
class RealFeatures:
    features: Tensor
    statistics: Statistics


def real_features(
    data: TrainingData, config: DataConfig, extractor, evaluation: EvaluationConfig, bar: Progress | None = None
) -> RealFeatures:
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
    features, _ = _features(extractor, real_chunks(data, evaluation.n, evaluation.seed), False, bar, "real")
    stats = feature_statistics(features)
    # written whole, then renamed (per process: parallel runs of a comparison may fill the same cache)
    atomic_write(
        path,
        lambda handle: np.savez(handle, key=json.dumps(key), features=features.numpy(), mu=stats.mu, sigma=stats.sigma),
        "cached real statistics",
    )
    return RealFeatures(features, stats)


# ----------------------------------------------------------------------------- the protocol


def kid_subset_size(n: int) -> int:
    """KID's subset size for ``n`` samples a side: 1000 (Bińkowski et al., torch-fidelity), or half of ``n``
    when there are not more than 1000, so that the 100 subsets differ and their spread means something."""
    return KID_SUBSET_SIZE if n > KID_SUBSET_SIZE else max(2, n // 2)


@dataclass
class Protocol:
    """What an evaluation measured with: eval.json records it beside the metrics."""

    n_generated: int
    n_real: int
    features: str  # the feature space used (never "auto")
    metrics: list[str]
    k_precision_recall: int
    k_density_coverage: int
    kid_subset_size: int
    kid_subsets: int = KID_SUBSETS
    seed: int = 0
    k: int | None = None  # evaluation.k: one k for all four k-NN metrics; None: 3 and 5


def protocol(evaluation: EvaluationConfig, data: DataConfig, n_generated: int, n_real: int) -> Protocol:
    features = resolve_features(evaluation, data)
    k_pr = evaluation.k or PRECISION_RECALL_K
    k_dc = evaluation.k or DENSITY_COVERAGE_K
    return Protocol(
        n_generated,
        n_real,
        features,
        resolve_metrics(evaluation, data, features),
        k_pr,
        k_dc,
        kid_subset_size(min(n_generated, n_real)),
        seed=evaluation.seed,
        k=evaluation.k,
    )


# ----------------------------------------------------------------------------- generated data


def generated_latents(latent_shape: tuple[int, ...], n: int, seed: int) -> Tensor:
    """Evaluation's own latents, from a generator of their own seed: it draws nothing from the training RNG."""
    return torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed + 7919))


def generated_samples(
    generator: nn.Module, latent_shape: tuple[int, ...], n: int, seed: int, device, bf16: bool = False
) -> Tensor:
    """``n`` samples, generated as the run trains (bf16 autocast in a bf16 run); metrics are float32 or more."""
    return generate(generator, generated_latents(latent_shape, n, seed).to(device), chunk=256, bf16=bf16).cpu()


def _features(extractor, chunks: Iterable[Tensor], classify: bool, bar: Progress | None, what: str):
    """Features (and class probabilities) of image chunks, a chunk at a time: the images are never all held."""
    features, probabilities = [], []
    task = bar.add_task(what, total=None) if bar is not None else None
    for chunk in chunks:
        features.append(extractor(chunk).float())
        if classify:
            probabilities.append(extractor.classify(chunk))
        if bar is not None:
            bar.advance(task, len(chunk))
    return torch.cat(features), torch.cat(probabilities) if classify else None


def score(fake: Tensor, probabilities: Tensor | None, real: RealFeatures | None, proto: Protocol) -> dict[str, float]:
    """The chosen metrics of generated features against real ones, by ``proto``."""
    results: dict[str, float] = {}
    if "fid" in proto.metrics:  # KID beside every FID, named alike: fid_digits, kid_digits, kid_digits_std
        suffix = "" if proto.features == "inception" else f"_{proto.features}"
        results[f"fid{suffix}"] = frechet_distance(feature_statistics(fake), real.statistics)
        if min(len(fake), len(real.features)) <= KID_SUBSET_SIZE:
            warnings.warn(
                f"KID: {min(len(fake), len(real.features))} samples a side are not more than its "
                f"{KID_SUBSET_SIZE}-sample subsets, which would all be the whole set (a spread of 0); "
                f"subsets of {proto.kid_subset_size} instead",
                stacklevel=2,
            )
        kid, kid_std = kernel_inception_distance(
            real.features, fake, proto.kid_subsets, proto.kid_subset_size, seed=proto.seed
        )
        results[f"kid{suffix}"], results[f"kid{suffix}_std"] = kid, kid_std
    if "pr" in proto.metrics:
        results.update(precision_recall_density_coverage(real.features, fake, proto.k))
    if "classes" in proto.metrics:
        results.update(class_metrics(probabilities))
    return results


def evaluate(
    run,
    evaluation: EvaluationConfig | None = None,
    ema: bool = False,
    bar: Progress | None = None,
    refinement: Refinement | None = None,
) -> dict[str, float]:
    """Every chosen metric for what ``run`` (a built or loaded Run) generates: its source's model on the trained
    generator (or on the EMA copy with ``ema``). With ``refinement`` (or ``evaluation.refine``) the refined
    samples are scored too, as ``refined/...`` beside the raw metrics, with what the refinement cost."""
    config: Config = run.config
    evaluation = evaluation or config.evaluation
    if ema and run.strategy.sampling_generator() is run.generator:
        raise ConfigError("--ema: this run keeps no EMA generator (set regression.ema when training)")
    generator = run.strategy.sampler(ema)
    bf16 = config.train.precision == "bf16"
    latent_shape = tuple(run.fixed_noise.shape[1:])
    proto = protocol(evaluation, config.data, evaluation.n, min(evaluation.n, len(run.data.dataset)))
    refinement = refinement or Refinement.of(evaluation)
    discriminator = run.strategy.discriminator() if refinement.kind != "none" else None
    if refinement.kind != "none" and discriminator is None:
        raise ConfigError(f"--refine {refinement.kind}: needs a discriminator; '{config.targets.name}' trains none")
    results: dict[str, float] = {"n": float(evaluation.n)}
    if "modes" in proto.metrics:  # VEEGAN's and PacGAN's protocol: 2,500 samples of their own, whatever n is
        drawn = generated_samples(generator, latent_shape, MODE_SAMPLES, evaluation.seed, run.device, bf16)
        means, std = mixture_means(config.data), mixture_std(config.data)
        results.update(mode_metrics(drawn, means, std))
        if discriminator is not None:
            cost = Cost()
            latents = generated_latents(latent_shape, MODE_SAMPLES, evaluation.seed).to(run.device)
            refined = refined_chunks(
                generator,
                Logit(discriminator),
                refinement,
                latents,
                256,
                _generating(generator, bf16),
                cost,
                evaluation.seed,
            )
            points = torch.cat([c.cpu() for c in refined])
            results.update({f"refined/{k}": v for k, v in mode_metrics(points, means, std).items()})
            results.update(cost.per_sample())
    if {"fid", "pr", "classes"} & set(proto.metrics):
        extractor = load_features(proto.features, run.device, evaluation.fid_weights)
        latents = generated_latents(latent_shape, evaluation.n, evaluation.seed).to(run.device)
        chunks = (c.cpu() for c in generate_chunks(generator, latents, 256, bf16))
        fake, probabilities = _features(extractor, chunks, "classes" in proto.metrics, bar, "generated")
        wanted = {"fid", "pr"} & set(proto.metrics)
        real = real_features(run.data, config.data, extractor, evaluation, bar) if wanted else None
        results.update(score(fake, probabilities, real, proto))
        if discriminator is not None:
            cost = Cost()
            refined = refined_chunks(
                generator,
                Logit(discriminator),
                refinement,
                latents,
                256,
                _generating(generator, bf16),
                cost,
                evaluation.seed,
            )
            fake, probabilities = _features(
                extractor, (c.cpu() for c in refined), "classes" in proto.metrics, bar, "refined"
            )
            results.update({f"refined/{k}": v for k, v in score(fake, probabilities, real, proto).items()})
            results.update(cost.per_sample())
    return results


def _generating(generator: nn.Module, bf16: bool):
    """How the run generates one chunk, as a function of its latents (``generate_chunks``' way)."""
    return lambda z: next(generate_chunks(generator, z, len(z), bf16))


def evaluate_images(
    count: int,
    chunks: Iterable[Tensor],
    data: DataConfig,
    evaluation: EvaluationConfig,
    device,
    bar: Progress | None = None,
) -> tuple[dict[str, float], Protocol]:
    """The chosen metrics of images made anywhere (``count`` of them, in chunks in [-1, 1]) against the real
    data of ``data``, in the same feature space and protocol as a run's evaluation."""
    if data.name == "toy2d":
        raise ConfigError("--samples: scores images; toy2d's real data are 2-D points")
    real_data = load_data(data)
    proto = protocol(evaluation, data, count, min(evaluation.n, len(real_data.dataset)))
    if "modes" in proto.metrics:
        raise ConfigError("--metrics modes: counts the modes of toy2d points, not of images")
    extractor = load_features(proto.features, device, evaluation.fid_weights)
    fake, probabilities = _features(extractor, chunks, "classes" in proto.metrics, bar, "samples")
    wanted = {"fid", "pr"} & set(proto.metrics)
    real = real_features(real_data, data, extractor, evaluation, bar) if wanted else None
    return {"n": float(count), **score(fake, probabilities, real, proto)}, proto


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
