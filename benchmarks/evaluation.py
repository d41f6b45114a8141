"""Speed of evaluation.

    python benchmarks/evaluation.py

1. `digits` and `mnist` spaces: all metrics (domain FID and KID,
   precision/recall, density/coverage, classes) for 2048 generated samples of
   the untrained generator of configs/digits.yaml (against the 1,797 real
   digits) and of configs/mnist5k.yaml (against 2048 of the 5,000 MNIST
   digits), with a cold and a warm real-statistics cache. Goal ≤ 10 s on 2 cores.
2. Inception (pytorch-fid, 299×299 input): images/s on this machine. The
   weights here are random (the real file cannot be downloaded offline); the
   network and therefore the time are the same.
3. The `mnist` space's floor: every metric between two disjoint sets of 2,048
   real mnist5k digits (a seeded permutation of the 5,000), the scale the
   README quotes for fid_mnist and kid_mnist. `--only real-vs-real` runs it alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from targetgen.config import load_config
from targetgen.data import as_mnist_size, mnist5k_digits
from targetgen.evaluation import evaluate
from targetgen.features import FID_WEIGHTS_FILE, InceptionFeatures, MnistFeatures
from targetgen.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall_density_coverage,
)
from targetgen.training import build_run


def domain_space(preset: str, cache: Path) -> None:
    run = build_run(load_config(f"configs/{preset}.yaml", [f"evaluation.cache_dir={cache}"]))
    for label in ("cold cache", "warm cache"):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = evaluate(run)
        print(
            f"{preset}, {run.config.evaluation.features} space, 2048 samples, {label}: "
            f"{time.perf_counter() - start:.2f} s "
            f"({', '.join(sorted(k for k in results if not k.startswith('class_')))})"
        )


def inception(tmp: Path) -> None:
    from pytorch_fid import inception as fid_inception

    with (
        mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None),
    ):
        model = fid_inception.fid_inception_v3()
    path = tmp / FID_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    features = InceptionFeatures(weights=path)
    images = torch.rand(200, 3, 64, 64) * 2 - 1
    features(images[:50])  # warm-up
    start = time.perf_counter()
    features(images)
    rate = len(images) / (time.perf_counter() - start)
    print(
        f"Inception pool3 on CPU ({torch.get_num_threads()} threads), 64×64 inputs resized to 299: {rate:.1f} images/s "
        f"→ 2048 + 2048 images ≈ {4096 / rate / 60:.1f} min (real statistics cached: half)"
    )


def real_vs_real(n: int = 2048, seed: int = 0) -> None:
    images, _ = mnist5k_digits()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    features = MnistFeatures()
    a, b = (features(as_mnist_size(images[idx], 32, 1)).float() for idx in (order[:n], order[n : 2 * n]))
    fid = frechet_distance(feature_statistics(b), feature_statistics(a))
    kid, kid_std = kernel_inception_distance(a, b, seed=seed)
    scores = precision_recall_density_coverage(a, b)
    print(
        f"mnist space, {n} real vs {n} other real mnist5k digits: fid_mnist {fid:.2f}, kid_mnist {kid:.0f} ± "
        f"{kid_std:.0f}, " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["domain", "inception", "real-vs-real"])
    only = parser.parse_args().only
    with tempfile.TemporaryDirectory() as tmp:
        if only in (None, "domain"):
            for preset in ("digits", "mnist5k"):
                domain_space(preset, Path(tmp) / "cache")
        if only in (None, "inception"):
            inception(Path(tmp))
        if only in (None, "real-vs-real"):
            real_vs_real()


if __name__ == "__main__":
    main()
