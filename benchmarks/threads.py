"""Training steps per second at 1, 2 and the default number of CPU threads, for toy2d and digits.

    python benchmarks/threads.py            # run it alone: other processes on the cores distort every figure
    python benchmarks/threads.py --quick

The default is what `train.threads` resolves to when unset (1 for the toy2d
MLPs, torch's own default for images). Goal: for both, the default runs at
>= 0.8× the steps per second of the best count measured. Each count is timed
in rounds, in alternating order, on the same built run; the median round counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from targetgen.config import load_config
from targetgen.data import epoch_order, iterate_batches
from targetgen.training import build_run
from targetgen.training.builder import PROCESS_THREADS, default_threads

SHAPES = {
    "toy2d": ["data.name=toy2d", "data.mixture=grid25", "model.nz=8", "train.batch_size=256"],
    "digits": ["data.name=digits", "data.image_size=32", "train.batch_size=128"],  # configs/digits.yaml's shape
}


def steps_per_second(run, batches, steps: int) -> float:
    started = time.perf_counter()
    for i in range(steps):
        run.strategy.step(batches[i % len(batches)], i, False)
    return steps / (time.perf_counter() - started)


def measure(name: str, overrides: list[str], rounds: int, seconds: float) -> dict[str, float]:
    config = load_config(None, [*overrides, "train.threads=1"])
    run = build_run(config)
    order = epoch_order(len(run.data.dataset), 0, 0)
    batches = list(iterate_batches(run.data.dataset, order, config.train.batch_size, 0, True))[:20]
    default = default_threads(config.data)
    counts = sorted({1, 2, default})
    torch.set_num_threads(max(counts))
    steps = max(5, int(seconds * steps_per_second(run, batches, 5)))  # about `seconds` per measurement
    results: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(rounds):
        for n in counts if r % 2 == 0 else reversed(counts):
            torch.set_num_threads(n)
            steps_per_second(run, batches, 2)  # warm-up at this count
            results[n].append(steps_per_second(run, batches, steps))
    medians = {n: statistics.median(v) for n, v in results.items()}
    best = max(medians.values())
    for n in counts:
        mark = " (default)" if n == default else ""
        print(f"{name:7s} {n} thread(s){mark:10s} {medians[n]:8.1f} steps/s   {medians[n] / best:.2f} of the best")
    print(f"{name:7s} default ÷ best = {medians[default] / best:.2f} (goal >= 0.8)")
    return {"default": medians[default], "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    args = parser.parse_args()
    rounds, seconds = (3, 1.0) if args.quick else (7, 3.0)
    print(f"torch {torch.__version__}, process default {PROCESS_THREADS} threads; medians of {rounds} rounds")
    for name, overrides in SHAPES.items():
        measure(name, overrides, rounds, seconds)


if __name__ == "__main__":
    main()
