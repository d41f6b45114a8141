"""Training steps per second by CPU thread policy, alone and beside other trainings on the same cores.

    python benchmarks/threads.py                 # run it alone: other processes on the cores distort every figure
    python benchmarks/threads.py --quick
    python benchmarks/threads.py --only loaded   # the busy-machine case alone

Every variant trains configs/mnist5k.yaml's networks (32×32×1, batch 32, fp32) in a fresh process, since
OpenMP reads its wait policy when it starts; variants are timed in rounds, in alternating order, and the
median round counts. "auto" is what targetgen chooses when train.threads and OMP_NUM_THREADS are unset
(``training.builder.default_threads``). The loaded case runs the variants beside two one-thread trainings
of the same networks. Goals: alone, auto ≥ 0.9× the best variant; loaded, ≥ 0.8× its fair share of the
machine (a third of the best alone: three trainings share it).

The toy2d MLPs are measured as before (``measure``): their default is one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from targetgen.config import load_config
from targetgen.data import epoch_order, iterate_batches
from targetgen.training import build_run
from targetgen.training.builder import default_threads

SHAPES = {
    "toy2d": ["data.name=toy2d", "data.mixture=grid25", "model.nz=8", "train.batch_size=256"],
    "digits": ["data.name=digits", "data.image_size=32", "train.batch_size=128"],  # configs/digits.yaml's shape
}
# (label, environment, train.threads): the policies compared for image runs
VARIANTS = [
    ("2 threads, OpenMP's default wait", {}, 2),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    ("1 thread", {}, 1),
    ("auto", {}, None),
]
TRAINING = ["train.precision=fp32", "train.channels_last=false", "train.loggers=jsonl"]


def steps_per_second(run, batches, steps: int) -> float:
    started = time.perf_counter()
    for i in range(steps):
        run.strategy.step(batches[i % len(batches)], i, False)
    return steps / (time.perf_counter() - started)


def measure(name: str, overrides: list[str], rounds: int, seconds: float) -> dict[str, float]:
    """One process, thread counts switched between rounds (for the MLPs, which have no OpenMP barriers to speak of)."""
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


def _child(seconds: float, threads: int | None) -> None:
    """In a fresh process: mnist5k's step for ``seconds``; prints steps/s and the thread count used."""
    extra = [f"train.threads={threads}"] if threads else []
    run = build_run(load_config("mnist5k", [*TRAINING, *extra]))
    order = epoch_order(len(run.data.dataset), 0, 0)
    batches = list(iterate_batches(run.data.dataset, order, run.config.train.batch_size, 0, True))[:50]
    steps_per_second(run, batches, 5)
    deadline, steps, started = time.perf_counter() + seconds, 0, time.perf_counter()
    while time.perf_counter() < deadline:
        run.strategy.step(batches[steps % len(batches)], steps, False)
        steps += 1
    print(f"{steps / (time.perf_counter() - started)} {run.config.train.threads}", flush=True)


def _timed(seconds: float, env: dict[str, str], threads: int | None) -> tuple[float, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    command = [sys.executable, __file__, "--child", str(seconds), str(threads or 0)]
    out = subprocess.run(command, capture_output=True, text=True, env={**clean, **env}, check=True).stdout.split()
    return float(out[-2]), int(out[-1])


def policies(rounds: int, seconds: float, loaded: bool) -> dict[str, float]:
    """Steps/s of every variant (median of ``rounds``), alone or beside two one-thread trainings."""
    background = []
    if loaded:
        command = [sys.executable, __file__, "--child", "100000", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        background = [subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env) for _ in range(2)]
        time.sleep(8)  # let them start training
    try:
        rates: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
        chosen: dict[str, int] = {}
        for r in range(rounds):
            for label, env, threads in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                rate, used = _timed(seconds, env, threads)
                rates[label].append(rate)
                chosen[label] = used
    finally:
        for process in background:
            process.kill()
            process.wait()
    medians = {label: statistics.median(v) for label, v in rates.items()}
    for label, rate in medians.items():
        print(f"  {label:36s} {rate:7.2f} steps/s  ({chosen[label]} thread(s))")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument("--only", choices=["mlp", "alone", "loaded"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(float(args.child[0]), int(args.child[1]) or None)
        return
    rounds, seconds = (3, 4.0) if args.quick else (5, 8.0)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; medians of {rounds} rounds of {seconds:g} s")
    if args.only in (None, "mlp"):
        measure("toy2d", SHAPES["toy2d"], rounds, 1.0 if args.quick else 3.0)
    alone = None
    if args.only in (None, "alone", "loaded"):
        print("mnist5k's networks, alone:")
        alone = policies(rounds, seconds, loaded=False)
        best = max(alone.values())
        print(f"  auto ÷ best alone = {alone['auto'] / best:.2f} (goal >= 0.9)")
    if args.only in (None, "loaded"):
        print("mnist5k's networks, beside two one-thread trainings of the same networks:")
        loaded = policies(rounds, seconds, loaded=True)
        fair = max(alone.values()) / 3
        for label, rate in loaded.items():
            print(f"  {label:36s} {rate / fair:.2f} of its fair share")
        print(f"  auto: {loaded['auto'] / fair:.2f} of its fair share (goal >= 0.8)")


if __name__ == "__main__":
    main()
