"""Every shipped preset loads and trains a few steps on data of its shape."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from targetgen.config import load_config
from targetgen.training import plan_run_dir, train

CONFIGS = Path(__file__).parents[1] / "configs"
SHORT = ["train.steps=2", "train.batch_size=4", "train.log_every=1"]


@pytest.fixture
def fake_celeba(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):  # CelebA's aligned images are 178×218
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")
    return tmp_path / "celeba"


@pytest.mark.parametrize(
    "name, source",
    [
        ("digits", "inversion"),
        ("mnist5k", "inversion"),
        ("mnist5k_cfg", "cfg"),
        ("toy2d", "inversion"),
        ("toy2d_mix", "mix"),
        ("celeba_baseline", "standard"),
        ("celeba_decomposed", "inversion"),
        ("pacgan_grid25", "standard"),
        ("pacgan_ring8", "standard"),
    ],
)
def test_preset_trains(name, source, tmp_path, fake_celeba):
    extra = [f"data.path={fake_celeba}", "data.num_workers=0"] if name.startswith("celeba") else []
    config = load_config(CONFIGS / f"{name}.yaml", [*SHORT, *extra, f"train.out_dir={tmp_path / 'runs'}"])
    assert config.targets.name == source
    run_dir = plan_run_dir(config, False)
    run = train(config, run_dir, progress=False)
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "samples" / "final.png").exists()
    if name.startswith("celeba"):
        assert run.data.image_shape == (3, 64, 64)
        assert sum(p.numel() for p in run.generator.parameters()) == 3_576_704
    if name == "mnist5k":  # evaluated at its last step, in the mnist space
        evaluated = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert run.data.image_shape == (1, 32, 32) and evaluated["eval/fid_mnist"] > 0 and "eval/kid_mnist" in evaluated
    if name == "celeba_decomposed":
        assert config.targets.options["lambda1"] == 0.25 and config.regression.lr == 0.0008
    if name.startswith("pacgan"):  # PacGAN's optimiser, data and networks; the last step is evaluated
        assert config.targets.options == {"g_lr": 0.0001, "d_lr": 0.0001, "betas": [0.8, 0.999]}
        assert len(run.data.dataset) == 100_000 and sum(p.numel() for p in run.generator.parameters()) == 484_802
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 2 and last["eval/modes_total"] == (25 if "grid" in name else 8)


def test_presets_are_found_by_name_as_well_as_by_path(tmp_path):
    from targetgen.config import presets

    shipped = presets()
    assert set(shipped) == {p.stem for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("compare/*.yaml")]}
    assert load_config("mnist5k").data.name == "mnist5k"
    assert load_config(CONFIGS / "mnist5k.yaml") == load_config("mnist5k")
    from cli_helpers import run_cli

    code, _, err = run_cli("train", "-c", "mnist5kk", "--out-dir", str(tmp_path))
    assert code == 2 and "config file not found: mnist5kk, and no preset of that name; did you mean 'mnist5k'?" in err


def test_presets_hold_no_results():
    """Preset comments say what a preset is; measured numbers belong in docs/results."""
    for path in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("compare/*.yaml")]:
        comments = " ".join(line.partition("#")[2] for line in path.read_text().splitlines() if "#" in line)
        assert "±" not in comments and "Measured" not in comments and "measured" not in comments, path
