"""What other tools read and clusters run: sample files, evaluating samples made anywhere, the CLI's
conventions, reports of partial comparisons, compare by plan / run index / collect and through submitit,
and the package's contents."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from conftest import TINY
from PIL import Image

TINY_CLI = [a for o in TINY for a in ("--set", o)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run that kept step_2 and step_4."""
    out = tmp_path_factory.mktemp("runs")
    code, _, err = run_cli(
        "train",
        "--out-dir",
        str(out),
        "--name",
        "r",
        "--targets",
        "standard",
        "--steps",
        "4",
        "--no-progress",
        *TINY_CLI,
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_checkpoints=2",
    )
    assert code == 0, err
    return out / "r"


# ----------------------------------------------------------------------------- sample


def test_sample_writes_an_npz_others_read_with_the_grids_pixels(run, tmp_path):
    code, out, err = run_cli(
        "sample", str(run), "--n", "70", "--out", str(tmp_path / "s.npz"), "--batch-size", "16", "--no-progress"
    )
    assert code == 0, err
    array = np.load(tmp_path / "s.npz")["arr_0"]
    assert array.shape == (70, 16, 16, 1) and array.dtype == np.uint8
    code, _, err = run_cli(
        "sample", str(run), "--n", "70", "--out", str(tmp_path / "grid.png"), "--batch-size", "16", "--no-progress"
    )  # the same batches: train-mode batch norm normalises over each
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    # torchvision's grid: 8 per row, 2 px of padding; the first tile holds the first sample, pixel for pixel
    assert np.array_equal(grid[2:18, 2:18], array[0, :, :, 0])
    assert np.array_equal(grid[2:18, 20:36], array[1, :, :, 0])


def test_sample_writes_one_png_per_sample_and_picks_the_checkpoint(run, tmp_path):
    for checkpoint, step in (("step_2", 2), ("last", 4), (str(run / "checkpoints" / "step_000002.pt"), 2)):
        folder = tmp_path / f"pngs-{step}-{len(checkpoint)}"
        code, out, err = run_cli(
            "sample", str(run), "--n", "5", "--out", str(folder), "--checkpoint", checkpoint, "--no-progress"
        )
        assert code == 0 and f"step {step})" in out, err
        assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    two = np.asarray(Image.open(tmp_path / "pngs-2-6" / "000000.png"))
    four = np.asarray(Image.open(tmp_path / "pngs-4-4" / "000000.png"))
    assert two.shape == (16, 16) and not np.array_equal(two, four)  # another checkpoint, other samples


def test_a_large_sample_is_generated_and_written_a_batch_at_a_time(run, tmp_path, monkeypatch):
    from targetgen import samples

    seen = []
    real = samples.to_uint8
    monkeypatch.setattr(samples, "to_uint8", lambda images: seen.append(len(images)) or real(images))
    code, _, err = run_cli(
        "sample", str(run), "--n", "1000", "--out", str(tmp_path / "big.npz"), "--batch-size", "64", "--no-progress"
    )
    assert code == 0, err
    assert max(seen) == 64 and sum(seen) == 1000
    with zipfile.ZipFile(tmp_path / "big.npz") as archive:
        assert archive.namelist() == ["arr_0.npy"]
    assert np.load(tmp_path / "big.npz", mmap_mode="r")["arr_0"].shape == (1000, 16, 16, 1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "jpeg", "--out", "{tmp}/s.png"], "--format: expected one of grid, png, npz, got 'jpeg'"),
        (["--out", "{tmp}/s.jpg"], "--out: {tmp}/s.jpg ends in '.jpg'; expected .png (a grid), .npz, or a folder"),
        (["--format", "npz", "--out", "{tmp}/s.png"], "--out: {tmp}/s.png does not fit --format npz"),
        (["--format", "png", "--out", "{tmp}/s.npz"], "--out: {tmp}/s.npz does not fit --format png"),
        (
            ["--checkpoint", "step_3", "--out", "{tmp}/s.png"],
            "--checkpoint step_3: {run} has no checkpoints/step_000003.pt (kept: last, step_000002, step_000004)",
        ),
        (["--checkpoint", "best", "--out", "{tmp}/s.png"], "has no checkpoints/best.pt"),
        (
            ["--checkpoint", "nonsense", "--out", "{tmp}/s.png"],
            "--checkpoint: expected last, best, step_N or a checkpoint",
        ),
    ],
)
def test_bad_sample_options_are_one_line(run, tmp_path, args, message):
    code, _, err = run_cli("sample", str(run), *[a.replace("{tmp}", str(tmp_path)) for a in args])
    expected = message.replace("{tmp}", str(tmp_path)).replace("{run}", str(run))
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


# ----------------------------------------------------------------------------- evaluate


def test_evaluating_a_runs_samples_from_a_file_equals_evaluating_the_run(run, tmp_path):
    """The same samples in the same space give the same numbers, however they reach evaluate."""
    from targetgen.evaluation import evaluate, generated_samples
    from targetgen.training import load_trained

    trained = load_trained(run)
    options = trained.config.evaluation
    samples = generated_samples(
        trained.generator, tuple(trained.fixed_noise.shape[1:]), options.n, options.seed, trained.device
    )
    np.savez(tmp_path / "float.npz", samples.numpy())  # float N×C×H×W in [-1, 1]: no rounding to uint8
    direct = evaluate(trained)
    code, out, err = run_cli("evaluate", "--samples", str(tmp_path / "float.npz"), "--real", str(run), "--no-progress")
    assert code == 0, err
    record = json.loads((tmp_path / "float.eval.json").read_text())
    for key in ("fid_digits", "kid_digits", "precision", "recall", "density", "coverage", "classes_covered"):
        assert record[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
    assert record["protocol"] == {
        "n_generated": 2048,
        "n_real": 1797,
        "features": "digits",
        "metrics": ["fid", "pr", "classes"],
        "k_precision_recall": 3,
        "k_density_coverage": 5,
        "kid_subset_size": 1000,
        "kid_subsets": 100,
        "seed": 0,
        "k": None,
    }


def test_eval_json_records_the_protocol_and_kid_subsets_shrink_for_small_n(run, tmp_path):
    code, out, err = run_cli("evaluate", str(run), "--n", "512", "--out", str(tmp_path / "e.json"), "--no-progress")
    assert code == 0, err
    assert "warning: KID: 512 samples a side are not more than its 1000-sample subsets" in err
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["protocol"]["features"] == "digits" and record["protocol"]["kid_subset_size"] == 256
    assert record["kid_digits_std"] > 1e-6  # subsets of half the samples differ: a spread that means something
    assert record["checkpoint"] == "last" and record["step"] == 4


def test_samples_of_another_shape_are_one_line_naming_both(run, tmp_path):
    np.savez(tmp_path / "rgb.npz", np.zeros((10, 32, 32, 3), dtype=np.uint8))
    code, _, err = run_cli("evaluate", "--samples", str(tmp_path / "rgb.npz"), "--real", "mnist5k")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds images of 3×32×32 (C×H×W); the real data are 1×32×32" in err
    code, _, err = run_cli("evaluate", "--samples", str(tmp_path / "rgb.npz"))
    assert code == 2 and "--samples: needs --real" in err
    code, _, err = run_cli("evaluate", str(run), "--samples", str(tmp_path / "rgb.npz"))
    assert code == 2 and "not both or neither" in err


def test_a_folder_of_images_made_elsewhere_is_scored_in_the_mnist_space(tmp_path):
    from targetgen.data import as_mnist_size, mnist5k_digits

    images = as_mnist_size(mnist5k_digits()[0][::16][:300], 32, 1)  # the file holds the classes in order
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for i, image in enumerate(images):
        pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    code, out, err = run_cli("evaluate", "--samples", str(folder), "--real", "mnist5k", "--n", "300", "--no-progress")
    assert code == 0, err
    record = json.loads((folder / "eval.json").read_text())
    assert record["protocol"]["features"] == "mnist" and record["n"] == 300
    assert record["fid_mnist"] < 50 and record["classes_covered"] == 10  # real digits score like real digits


# ----------------------------------------------------------------------------- command-line conventions


def test_version_short_help_and_completion():
    from targetgen import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"targetgen {__version__}"
    code, out, _ = run_cli("-h")
    assert code == 0 and "--install-completion" in out and "train" in out
    code, out, _ = run_cli("sample", "-h")
    assert code == 0 and "--checkpoint" in out and "--format" in out


def test_report_of_a_comparison_without_finished_runs_is_one_line_and_a_consistent_file(tmp_path):
    from targetgen.compare import plan_comparison, write_plan

    out = tmp_path / "c"
    plan = plan_comparison(None, out, [*TINY, "train.steps=2"], "standard,inversion", seeds=1, control=False)
    write_plan(plan, "targetgen compare (test)")
    code, text, err = run_cli("report", str(out))
    assert code == 0, err
    assert text.strip().endswith("0 of 2 planned runs finished; missing: standard-seed0, inversion-seed0")
    report = (out / "report.md").read_text()
    assert "0 of 2 planned runs finished" in report
    header = next(line for line in report.splitlines() if line.startswith("| configuration"))
    rule = report.splitlines()[report.splitlines().index(header) + 1]
    assert header.count("|") == rule.count("|")
    assert not (out / "curves.png").exists()


# ----------------------------------------------------------------------------- compare on clusters


COMPARE = [
    "--targets",
    "standard",
    "--seeds",
    "2",
    "--no-control",
    "--no-progress",
    *TINY_CLI,
    "--set",
    "train.steps=3",
    "--set",
    "evaluation.every=3",
    "--set",
    "evaluation.n=64",
]


def test_plan_then_run_each_index_then_collect(tmp_path, monkeypatch):
    out = tmp_path / "c"
    code, text, err = run_cli("compare", "--out", str(out), "--plan-only", *COMPARE)
    assert code == 0 and "--run-index I (I = 0 … 1" in text, err
    assert not (out / "runs").exists()
    code, text, err = run_cli("compare", "--out", str(out), "--run-index", "1")
    assert code == 0 and text.startswith("done standard seed 1"), err
    assert (out / "runs" / "standard-seed1" / "summary.json").is_file()
    assert not (out / "runs" / "standard-seed0").exists()
    code, text, err = run_cli("compare", "--out", str(out), "--collect")
    assert code == 0 and "1 of 2 planned runs finished; missing: standard-seed0" in text, err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    code, text, err = run_cli("compare", "--out", str(out), "--run-index", "auto")
    assert code == 0, err
    code, text, err = run_cli("compare", "--out", str(out), "--collect")
    assert code == 0 and "(2 runs)" in text, err
    assert "| standard |" in (out / "report.md").read_text()
    code, _, err = run_cli("compare", "--out", str(out), "--run-index", "2")
    assert code == 2 and "--run-index: 2 is beyond the plan" in err and "which has 2 runs (0 to 1)" in err
    code, _, err = run_cli("compare", "--out", str(tmp_path / "none"), "--collect")
    assert code == 2 and "holds no comparison (no plan.json)" in err


def test_a_relative_and_an_absolute_out_are_the_same_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("compare", "--out", "c", "--plan-only", *COMPARE)
    assert code == 0, err
    code, _, err = run_cli("compare", "--out", str(tmp_path / "c"), "--plan-only", *COMPARE)
    assert code == 0, err  # not "planned differently (train.out_dir ...)"
    assert f"out_dir: {tmp_path / 'c' / 'runs'}" in (tmp_path / "c" / "configs" / "standard-seed0.yaml").read_text()


def test_compare_through_submitit_local_jobs(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "c"
    command = [
        sys.executable,
        "-m",
        "targetgen.cli",
        "compare",
        "--out",
        str(out),
        "--executor",
        "submitit",
        "--cluster",
        "local",
        "--jobs",
        "2",
        *COMPARE,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.count("done standard seed") == 2
    for seed in (0, 1):
        summary = json.loads((out / "runs" / f"standard-seed{seed}" / "summary.json").read_text())
        assert summary["steps"] == 3 and "fid_digits" in summary["metrics"]
    assert (out / "submitit").is_dir() and (out / "report.md").is_file()


# ----------------------------------------------------------------------------- packaging


def test_the_wheel_ships_the_package_data_it_needs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"cannot build a wheel here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("targetgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "targetgen/py.typed",
        "targetgen/weights/digits_cnn.pt",
        "targetgen/weights/mnist_cnn.pt",
        "targetgen/configs/mnist5k.yaml",
        "targetgen/configs/compare/toy2d_compare.yaml",
        "targetgen/plugins/inversion.py",
        "targetgen/cli/main.py",
    } <= names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Classifier: Programming Language :: Python :: 3" in metadata


def test_sample_grids_have_torchvisions_pixels(tmp_path):
    """targetgen writes its grids itself (torchvision's import costs every training seconds): the same pixels."""
    from torchvision.utils import save_image

    from targetgen.samples import save_samples

    torch.manual_seed(0)
    for shape in [(64, 1, 16, 16), (7, 3, 8, 8), (1, 1, 5, 5), (10, 3, 4, 6)]:
        images = torch.randn(shape) * 0.7
        images[0, 0, 0, :3] = torch.tensor([1.0, -1.0, 1 / 255])  # the ends of the range and a rounding edge
        nrow = max(1, int(len(images) ** 0.5))
        save_image(images, tmp_path / "tv.png", nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
        save_samples(images, tmp_path / "ours.png")
        assert np.array_equal(np.array(Image.open(tmp_path / "tv.png")), np.array(Image.open(tmp_path / "ours.png")))


def test_a_training_without_evaluation_never_imports_torchvision(tmp_path):
    code = (
        "import sys; from targetgen.cli.main import main; sys.argv = ['targetgen', 'train', '--out-dir', "
        f"{str(tmp_path)!r}, '--no-progress', '--steps', '2', '--set', 'data.image_size=16', '--set', "
        "'model.ngf=8', '--set', 'model.ndf=8', '--set', 'train.loggers=jsonl', '--set', 'evaluation.every=0']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "digits-inversion" / "samples").is_dir()
