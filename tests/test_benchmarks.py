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

    config = load_config(
        SEARCH.parents[1] / "configs" / "toy2d.yaml",
        [
            "data.num_points=300",
            "train.batch_size=100",
            "train.steps=6",
            "targets.options.staleness=1",
            "targets.options.samples_factor=3",
            "train.loggers=jsonl",
            f"train.out_dir={tmp_path}",
            "train.name=imle",
        ],
        "imle",
    )
    train(config, plan_run_dir(config, False), progress=False)
    result = imle_cloud.landing(tmp_path / "imle", prior=500)
    matched, unmatched, prior = result["matched"], result["unmatched"], result["prior"]
    assert matched["latents"] == 300 and prior["latents"] == 500
    assert matched["distinct"] + unmatched["latents"] == 900  # the last pool: 3 × 300, each latent one or the other
    assert all(
        0 <= r["share_within_3_sigma"] <= 1 and r["median_distance"] <= r["p90_distance"] for r in result.values()
    )


ANCHOR = Path(__file__).parents[1] / "benchmarks" / "pacgan_anchor.py"


def write_seed(folder: Path, seed: int, curve: list[tuple[int, float, float, float, float]]):
    """A run's metrics.jsonl: a training line (no evaluation) and an evaluation per step, 0.6 s a step."""
    run_dir = folder / "runs" / f"standard-seed{seed}"
    run_dir.mkdir(parents=True)
    lines = []
    for step, modes, hq, kl, strict in curve:
        lines += [
            {"step": step, "train_s": 0.6 * step, "d_loss": 1.0},
            {
                "step": step,
                "train_s": 0.6 * step,
                "eval/modes_covered": modes,
                "eval/high_quality_share": hq,
                "eval/mode_kl_to_uniform": kl,
                "eval/modes_covered_20": strict,
            },
        ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_pacgan_anchor_tables_the_last_evaluations_against_pacgan(tmp_path):
    grid, ring = tmp_path / "pacgan_grid25", tmp_path / "pacgan_ring8"
    write_seed(grid, 0, [(1000, 8, 0.1, 1.3, 0), (2000, 16, 0.90, 0.6, 12)])
    write_seed(grid, 1, [(1000, 9, 0.1, 1.2, 0), (2000, 18, 0.94, 0.8, 14)])
    write_seed(ring, 0, [(1000, 3, 0.5, 0.9, 1)])
    figure = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, str(ANCHOR), "--runs", str(tmp_path), "--figure", str(figure)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| pacgan_grid25 | 0 | 2,000 | 16 | 90.0% | 0.60 | 12 | 20.0 min |" in out
    assert "| pacgan_grid25 | mean ± SE | | 17.0 ± 1.0 | 92.0 ± 2.0 % | 0.70 ± 0.10 | 13.0 ± 1.0 | |" in out
    assert "| pacgan_ring8 | 0 | 1,000 | 3 | 50.0% | 0.90 | 1 | 10.0 min |" in out
    assert "pacgan_grid25: modes 17.0 (PacGAN 17.3), high quality 92.0%: anchor holds" in out
    assert "pacgan_ring8: modes 3.0 (PacGAN 6.3), high quality 50.0%: anchor not reproduced" in out
    assert figure.stat().st_size > 10_000
    earlier = subprocess.run(
        [sys.executable, str(ANCHOR), "--runs", str(tmp_path), "--figure", str(figure), "--step", "1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "| pacgan_grid25 | 1 | 1,000 | 9 | 10.0% | 1.20 | 0 | 10.0 min |" in earlier.stdout
