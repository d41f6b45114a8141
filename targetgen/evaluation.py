"""Evaluate a generator: FID, precision/recall, density/coverage, modes, digit classes.

The paper's protocol by default: 2048 generated samples against 2048 real
images drawn at random (all of them when there are fewer), both with a fixed
seed. Real statistics are cached per (data set fingerprint, feature space and
its weights, N, image size); a cache file whose recorded key differs from the
one asked for is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
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
from .metrics import MODE_SAMPLES, Statistics, class_metrics, feature_statistics, frechet_distance, mode_metrics
from .metrics import precision_recall_density_coverage
from .samples import generate

METRICS = ("fid", "pr", "modes", "classes")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "targetgen"


def resolve_features(evaluation: EvaluationConfig, data: DataConfig) -> str:
    if evaluation.features != "auto":
        return evaluation.features
    if data.name == "toy2d":
        return "pixels"
    return "digits" if data.name == "digits" else "inception"


def resolve_metrics(evaluation: EvaluationConfig, data: DataConfig, features: str) -> list[str]:
    if evaluation.metrics == "auto":
        chosen = ["fid", "pr"] + (["modes"] if data.name == "toy2d" else []) + (["classes"] if features == "digits" else [])
    else:
        chosen = [m.strip() for m in evaluation.metrics.split(",") if m.strip()]
    for metric in chosen:
        if metric not in METRICS:
            raise ConfigError(f"evaluation.metrics: unknown metric {metric!r}; expected some of {', '.join(METRICS)}")
    if "modes" in chosen and data.name != "toy2d":
        raise ConfigError("evaluation.metrics: 'modes' counts the modes of a toy2d mixture; these data are " + data.name)
    if "classes" in chosen and features != "digits":
        raise ConfigError("evaluation.metrics: 'classes' needs the digits classifier: use features digits")
    return chosen


def load_features(name: str, device: torch.device, fid_weights: str | None = None):
    cls = registry.load("features", name)
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
            warnings.warn(f"cached real statistics {path} were made for {recorded}, not {key}: recomputing", stacklevel=2)
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(f"cached real statistics {path} are unreadable ({err}): recomputing", stacklevel=2)
    features = extractor(real_subset(data, evaluation.n, evaluation.seed)).float()
    stats = feature_statistics(features)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed; per process, as parallel runs (compare --jobs) may fill the same cache
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial.npz")
    np.savez(partial, key=json.dumps(key), features=features.numpy(), mu=stats.mu, sigma=stats.sigma)
    partial.replace(path)
    return RealFeatures(features, stats)


# ----------------------------------------------------------------------------- generated data


def generated_samples(generator: nn.Module, latent_shape: tuple[int, ...], n: int, seed: int, device) -> Tensor:
    """``n`` samples from latents of their own seed: evaluation draws nothing from the training RNG."""
    latents = torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed + 7919))
    return generate(generator, latents.to(device), chunk=256).cpu()


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
    samples = generated_samples(generator, tuple(run.fixed_noise.shape[1:]), evaluation.n, evaluation.seed, run.device)
    results: dict[str, float] = {"n": float(evaluation.n)}
    if "modes" in chosen:  # VEEGAN's and PacGAN's protocol: 2,500 samples of their own, whatever n is
        drawn = generated_samples(generator, tuple(run.fixed_noise.shape[1:]), MODE_SAMPLES, evaluation.seed, run.device)
        results.update(mode_metrics(drawn, mixture_means(config.data), mixture_std(config.data)))
    if "fid" in chosen or "pr" in chosen or "classes" in chosen:
        extractor = load_features(features_name, run.device, evaluation.fid_weights)
        fake = extractor(samples).float()
        if "fid" in chosen or "pr" in chosen:
            real = real_features(run.data, config.data, extractor, evaluation)
            if "fid" in chosen:
                name = "fid" if features_name == "inception" else f"fid_{features_name}"
                results[name] = frechet_distance(feature_statistics(fake), real.statistics)
            if "pr" in chosen:
                results.update(precision_recall_density_coverage(real.features, fake))
        if "classes" in chosen:
            results.update(class_metrics(extractor.classify(samples)))
    return results
