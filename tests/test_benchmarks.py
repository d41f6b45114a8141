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
