"""The benchmark scripts run against the library's current API (they are not
otherwise exercised by the suite, and one had stopped working unnoticed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SEARCH = Path(__file__).parents[1] / "benchmarks" / "search.py"


@pytest.mark.parametrize("variant", [[], ["--adaptive"]])
def test_search_memory_probe_runs_one_imle_matching(variant):
    command = [sys.executable, str(SEARCH), "--rss-probe", "40", "--space", "downsample", "--budget", "0.05", *variant]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["n"] == 40 and probe["data_mib"] == 40 * 3 * 64 * 64 * 4 / 2**20
    assert probe["peak_mib"] >= probe["before_mib"] > 0


def test_threads_benchmark_measures_every_count():
    sys.path.insert(0, str(SEARCH.parent))
    try:
        import threads  # benchmarks/threads.py
    finally:
        sys.path.remove(str(SEARCH.parent))
    result = threads.measure("toy2d", threads.SHAPES["toy2d"], rounds=1, seconds=0.05)
    assert result["best"] >= result["default"] > 0


def test_imle_cloud_measures_matched_and_unmatched_latents(tmp_path):
    sys.path.insert(0, str(SEARCH.parent))
    try:
        import imle_cloud  # benchmarks/imle_cloud.py
    finally:
        sys.path.remove(str(SEARCH.parent))
    from targetgen.config import load_config
    from targetgen.training import plan_run_dir, train

    config = load_config(SEARCH.parents[1] / "configs" / "toy2d.yaml", [
        "data.num_points=300", "train.batch_size=100", "train.steps=6", "targets.options.staleness=1",
        "targets.options.samples_factor=3", "train.loggers=jsonl", f"train.out_dir={tmp_path}", "train.name=imle"], "imle")
    train(config, plan_run_dir(config, False), progress=False)
    result = imle_cloud.landing(tmp_path / "imle", prior=500)
    matched, unmatched, prior = result["matched"], result["unmatched"], result["prior"]
    assert matched["latents"] == 300 and prior["latents"] == 500
    assert matched["distinct"] + unmatched["latents"] == 900  # the last pool: 3 × 300, each latent one or the other
    assert all(0 <= r["share_within_3_sigma"] <= 1 and r["median_distance"] <= r["p90_distance"] for r in result.values())
