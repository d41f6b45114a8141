"""Shared fixtures: tiny, fast configurations on the bundled digits data."""

from __future__ import annotations

import signal

import pytest
import torch

# A test suite started as a background job (`pytest &`) ignores SIGINT, and its subprocesses inherit that: the
# tests that stop a training with Ctrl-C would wait for ever. A handler of our own is reset in every child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from targetgen.config import load_config

TINY = [
    "data.image_size=16",
    "model.nz=8",
    "model.ngf=8",
    "model.ndf=8",
    "train.batch_size=32",
    "train.log_every=1",
    "train.sample_every=1000",
    "train.checkpoint_every=1000",
    "train.loggers=jsonl",  # TensorBoard's import costs seconds per process; tests/test_logging.py covers it
    # float32 and the default layout, on every machine: the equivalence and exact-resume tests compare bits
    # (bf16 and channels-last are tested on their own, tests/test_precision.py)
    "train.precision=fp32",
    "train.channels_last=false",
    "train.threads=1",  # never chosen by the load: a split run and a whole one must compute alike
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Evaluation caches real statistics under $XDG_CACHE_HOME: never the user's own during tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny_config(tmp_path):
    """A function building a tiny digits config writing under tmp_path."""

    def make(*overrides: str, targets: str | None = None, name: str = "run"):
        return load_config(None, [*TINY, f"train.out_dir={tmp_path}", f"train.name={name}", *overrides], targets)

    return make


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))
