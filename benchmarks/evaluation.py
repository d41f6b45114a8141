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
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from targetgen.config import load_config
from targetgen.evaluation import evaluate
from targetgen.features import FID_WEIGHTS_FILE, InceptionFeatures
from targetgen.training import build_run


def domain_space(preset: str, cache: Path) -> None:
    run = build_run(load_config(f"configs/{preset}.yaml", [f"evaluation.cache_dir={cache}"]))
    for label in ("cold cache", "warm cache"):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = evaluate(run)
        print(f"{preset}, {run.config.evaluation.features} space, 2048 samples, {label}: {time.perf_counter() - start:.2f} s "
              f"({', '.join(sorted(k for k in results if not k.startswith('class_')))})")


def inception(tmp: Path) -> None:
    from pytorch_fid import inception as fid_inception

    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        model = fid_inception.fid_inception_v3()
    path = tmp / FID_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    features = InceptionFeatures(weights=path)
    images = torch.rand(200, 3, 64, 64) * 2 - 1
    features(images[:50])  # warm-up
    start = time.perf_counter()
    features(images)
    rate = len(images) / (time.perf_counter() - start)
    print(f"Inception pool3 on CPU ({torch.get_num_threads()} threads), 64×64 inputs resized to 299: {rate:.1f} images/s "
          f"→ 2048 + 2048 images ≈ {4096 / rate / 60:.1f} min (real statistics cached: half)")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("digits", "mnist5k"):
            domain_space(preset, Path(tmp) / "cache")
        inception(Path(tmp))


if __name__ == "__main__":
    main()
