"""The command line: one-line errors, training, sampling, plugins."""

import subprocess
import sys

from cli_helpers import run_cli
from PIL import Image


def test_train_then_sample(tmp_path):
    code, out, err = run_cli(
        "train",
        "--targets",
        "standard",
        "--steps",
        "3",
        "--out-dir",
        str(tmp_path),
        "--name",
        "r",
        "--set",
        "data.image_size=16",
        "--set",
        "model.ngf=8",
        "--set",
        "model.ndf=8",
        "--no-progress",
    )
    assert code == 0, err
    run_dir = tmp_path / "r"
    assert "checkpoint: " in out and (run_dir / "checkpoints" / "last.pt").exists()
    assert (run_dir / "samples" / "final.png").exists() and (run_dir / "config.yaml").exists()
    grid = tmp_path / "grid.png"
    code, out, err = run_cli("sample", str(run_dir), "--n", "16", "--out", str(grid))
    assert code == 0, err
    assert Image.open(grid).size == (4 * 18 + 2, 4 * 18 + 2)  # 4×4 grid of 16 px with 2 px padding

    code, out, err = run_cli(
        "train", "--targets", "standard", "--steps", "3", "--out-dir", str(tmp_path), "--name", "r"
    )
    assert code == 2 and "exists; continue it with --resume" in err


def test_config_errors_are_one_line_without_traceback(tmp_path):
    code, out, err = run_cli("train", "--set", "train.batchsize=3")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: unknown key 'train.batchsize'; did you mean 'batch_size'? (valid keys: "
        "name, out_dir, epochs, steps, max_seconds, batch_size, drop_last, seed, device, log_every, "
        "sample_every, checkpoint_every, precision, channels_last, cudnn_benchmark, threads, loggers, "
        "keep_checkpoints, best_metric)"
    ]
    assert "Traceback" not in err


def test_console_script_reports_bad_data_path(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "targetgen.cli",
            "train",
            "--set",
            "data.name=folder",
            "--set",
            f"data.path={tmp_path}/missing",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: data.path: {tmp_path}/missing does not exist"


def test_help_explains_commands():
    code, out, _ = run_cli("train", "--help")
    assert code == 0 and "--resume" in out and "--targets" in out


def test_plugins_table_lists_builtins():
    code, out, _ = run_cli("plugins")
    assert code == 0
    for name in ("inversion", "l2", "ssim", "tv", "proximity", "range"):
        assert name in out
