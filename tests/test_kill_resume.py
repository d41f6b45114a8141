"""kill -9 at random moments, resume, and end bit-identical to a run that was never interrupted.

Real `targetgen train` processes are killed (SIGKILL: no handler runs) after a
random number of logged steps plus a random few milliseconds, so the kills land
inside steps, inside metrics.jsonl appends and inside checkpoint writes. Each
killed run is resumed (or started again when it died before its first
checkpoint) until it finishes; then every tensor of its last checkpoint — both
networks, every optimiser, the RNG states — and every logged statistic must
equal the uninterrupted run's.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY

from targetgen.training.rundir import read_metrics

STEPS = 90
KILLS_PER_SOURCE = 4
EXTRA = {
    "standard": [],
    "inversion": ["targets.options.lambda1=0.25", "regression.lr=0.0008", "regression.ema=0.9"],
    "imle": ["targets.options.staleness=1", "targets.options.samples_factor=2"],
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # bit-identical needs the same thread count
TIMING = ("images_per_s", "train_s")  # wall-clock figures differ between runs by nature


def command(out, name, targets, *extra):
    sets = [*TINY, "train.checkpoint_every=3", "train.log_every=1", *EXTRA[targets]]
    return [
        sys.executable,
        "-m",
        "targetgen.cli",
        "train",
        "--targets",
        targets,
        "--steps",
        str(STEPS),
        "--out-dir",
        str(out),
        "--name",
        name,
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]


def logged(run_dir):
    return len(read_metrics(run_dir / "metrics.jsonl"))


def kill_after(process, run_dir, steps, delay):
    """SIGKILL ``process`` once ``steps`` more steps are logged, ``delay`` seconds later; False if it finished first."""
    start = logged(run_dir) if (run_dir / "metrics.jsonl").exists() else 0
    while process.poll() is None and ((run_dir / "metrics.jsonl").exists() is False or logged(run_dir) < start + steps):
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def tensors(state, prefix=""):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from tensors(value, f"{prefix}{key}.")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from tensors(value, f"{prefix}{i}.")
    elif isinstance(state, torch.Tensor):
        yield prefix.rstrip("."), state


@pytest.mark.slow
@pytest.mark.parametrize("targets", list(EXTRA))
def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, targets):
    whole = subprocess.run(command(tmp_path, "whole", targets), env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    draw = random.Random(f"kills-{targets}")
    run_dir = tmp_path / "killed"
    kills = 0
    while True:
        resumable = (run_dir / "checkpoints" / "last.pt").exists()
        extra = ["--resume", str(run_dir)] if resumable else ["--overwrite"]
        argv = command(tmp_path, "killed", targets)
        if resumable:  # a resumed run keeps its saved config
            argv = [*argv[:4], "--no-progress", *extra]
        else:
            argv = [*argv, *extra]
        process = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < KILLS_PER_SOURCE and kill_after(process, run_dir, draw.randint(1, 20), draw.uniform(0, 0.02)):
            kills += 1
            continue
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        break
    assert kills == KILLS_PER_SOURCE

    expected = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    a, b = dict(tensors(expected)), dict(tensors(resumed))
    assert a.keys() == b.keys() and any(k.startswith("strategy.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("step", "epoch", "batch", "images"):
        assert expected[key] == resumed[key], key
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir / "metrics.jsonl")]
    assert records == [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")
    ]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]  # no orphan left
