"""Checkpoints: exact resume, crash recovery, atomic writes, divergence guard."""

import json
from pathlib import Path

import pytest
import torch

from targetgen.config import load_config
from targetgen.errors import CheckpointError, DivergenceError, RunDirectoryError
from targetgen.training import CHECKPOINT, config_of_run, plan_run_dir, train
from targetgen.training import checkpoint as checkpoint_module
from targetgen.training.checkpoint import load_checkpoint
from targetgen.training.decomposed import Decomposed
from targetgen.training.rundir import read_metrics
from targetgen.training.standard import StandardGAN

# A run of 20 steps crosses two epoch boundaries of the 1,797 digits at batch 128.
LONG = ["train.batch_size=128", "train.checkpoint_every=7"]


def params(run):
    state = {f"G.{k}": v for k, v in run.generator.state_dict().items()}
    state.update({f"S.{k}": v for k, v in flatten(run.strategy.state_dict()).items()})
    return state


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items() if isinstance(d, dict) else enumerate(d):
        if isinstance(v, (dict, list)):  # lists: the regression engine's replay pool
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


EXTRA = {
    "standard": ("standard", []),
    "inversion": ("inversion", ["targets.options.lambda1=0.25", "regression.lr=0.0008", "regression.ema=0.9"]),
    # IMLE re-matches at every epoch boundary, one of which falls after the split
    "imle": ("imle", ["targets.options.staleness=1", "targets.options.samples_factor=2"]),
    "imle-adaptive": (
        "imle",
        [
            "targets.options.adaptive=true",
            "targets.options.staleness=1",
            "targets.options.samples_factor=2",
            "targets.options.force_after=2",
        ],
    ),
    "nearest": ("nearest", ["targets.options.alpha=0.5", "targets.options.k=2"]),
    # regression fitted until reach 0.5 (at most 4 steps) from a replay pool of the last 3 batches
    "fit-replay": (
        "inversion",
        [
            "targets.options.lambda1=0.25",
            "targets.options.step_rule=normalized",
            "regression.until_reach=0.5",
            "regression.max_steps=4",
            "regression.replay=3",
        ],
    ),
    # every member's state (a discriminator, IMLE's matches) under its label
    "mix-split": (
        "mix",
        [
            "targets.options.sources=[{name: inversion, weight: 0.7, options: {lambda1: 0.25}}, "
            "{name: imle, weight: 0.3, options: {staleness: 1, samples_factor: 2}}]"
        ],
    ),
    "mix-alternate": (
        "mix",
        [
            "targets.options.mode=alternate",
            "targets.options.sources=[{name: inversion, weight: 0.6}, "
            "{name: imle, weight: 0.4, options: {staleness: 1, samples_factor: 2}}]",
        ],
    ),
}


@pytest.mark.parametrize("case", list(EXTRA))
def test_stop_and_resume_is_bit_identical(tiny_config, case):
    targets, extra = EXTRA[case]
    whole = train(
        (c := tiny_config(*LONG, "train.steps=20", *extra, targets=targets, name="whole")),
        plan_run_dir(c, False),
        progress=False,
    )

    first = tiny_config(*LONG, "train.steps=13", *extra, targets=targets, name="split")
    run_dir = plan_run_dir(first, False)
    train(first, run_dir, progress=False)
    resumed = train(config_of_run(run_dir, ["train.steps=20"]), run_dir, resume=True, progress=False)

    assert_identical(params(whole), params(resumed))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_resampled_toy2d_resumes_bit_identically(tiny_config):
    # num_points = batch size: every step is an epoch with a fresh draw of 32 points
    toy = [
        "data.name=toy2d",
        "data.mixture=ring8",
        "data.num_points=32",
        "data.resample=true",
        "train.checkpoint_every=7",
    ]
    whole = train(
        (c := tiny_config(*toy, "train.steps=20", targets="standard", name="whole")),
        plan_run_dir(c, False),
        progress=False,
    )
    first = tiny_config(*toy, "train.steps=13", targets="standard", name="split")
    run_dir = plan_run_dir(first, False)
    train(first, run_dir, progress=False)
    resumed = train(config_of_run(run_dir, ["train.steps=20"]), run_dir, resume=True, progress=False)
    assert_identical(params(whole), params(resumed))
    assert torch.equal(whole.data.dataset.images, resumed.data.dataset.images)  # both at epoch 19's draw
    fixed = train(
        (c := tiny_config(*toy[:-2], "train.steps=20", targets="standard", name="fixed")),
        plan_run_dir(c, False),
        progress=False,
    )
    assert not torch.equal(params(fixed)["G.main.0.weight"], params(whole)["G.main.0.weight"])


def test_crashed_run_resumes_from_its_last_checkpoint(tiny_config, monkeypatch):
    whole = train(
        (c := tiny_config(*LONG, "train.steps=12", targets="standard", name="whole")),
        plan_run_dir(c, False),
        progress=False,
    )

    config = tiny_config(*LONG, "train.steps=12", targets="standard", name="crash")
    run_dir = plan_run_dir(config, False)
    original = StandardGAN.step

    def crash_at_ten(self, batch, step, log):
        if step == 9:
            raise KeyboardInterrupt  # the machine goes away mid-run
        return original(self, batch, step, log)

    monkeypatch.setattr(StandardGAN, "step", crash_at_ten)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, progress=False)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 7
    monkeypatch.setattr(StandardGAN, "step", original)
    resumed = train(config_of_run(run_dir), run_dir, resume=True, progress=False)
    assert_identical(params(whole), params(resumed))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))  # no step logged twice


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint_module.atomic_save({"format": 2, "step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*last.pt \(disk full\); the previous checkpoint is intact"
    ):
        checkpoint_module.atomic_save({"format": 2, "step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_divergence_stops_with_step_and_loss_and_keeps_the_checkpoint(tiny_config, monkeypatch):
    config = tiny_config("train.steps=10", "train.checkpoint_every=2", targets="standard")
    run_dir = plan_run_dir(config, False)
    original = StandardGAN.step

    def nan_at_step_five(self, batch, step, log):
        stats = original(self, batch, step, log)
        if step == 4:
            stats["g_loss"] = float("nan")
        return stats

    monkeypatch.setattr(StandardGAN, "step", nan_at_step_five)
    with pytest.raises(
        DivergenceError,
        match=r"diverged at step 5: g_loss = nan; the last checkpoint \(.*last.pt, step 4\) is finite and kept",
    ):
        train(config, run_dir, progress=False)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 4


def test_run_directory_is_not_reused_silently(tiny_config):
    config = tiny_config("train.steps=1", targets="standard")
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    with pytest.raises(RunDirectoryError, match="exists; continue it with --resume .* --overwrite"):
        plan_run_dir(config, overwrite=False)
    with pytest.raises(RunDirectoryError, match="exists; continue it with --resume .* --overwrite"):
        train(config, run_dir, progress=False)  # checked again under the lock, when the directory is claimed
    assert (
        plan_run_dir(config, overwrite=True) == run_dir and (run_dir / CHECKPOINT).is_file()
    )  # planning deletes nothing
    train(config, run_dir, overwrite=True, progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "samples",
    ]


def test_resume_may_only_change_the_length(tiny_config):
    config = tiny_config("train.steps=1", targets="standard")
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    with pytest.raises(Exception, match="only train.steps, train.epochs, "):
        config_of_run(run_dir, ["regression.lr=0.1"])
    with pytest.raises(RunDirectoryError, match="not a targetgen run directory"):
        config_of_run(run_dir / "samples")


TOY = Path(__file__).parents[1] / "configs" / "toy2d.yaml"
TIMED = [
    "train.steps=100000",
    "train.max_seconds=0.5",
    "train.log_every=100000",
    "train.checkpoint_every=10",
    "train.sample_every=100000",
    "evaluation.every=100000",
    "evaluation.n=64",
    "data.num_points=500",
    "train.loggers=jsonl",
]


def test_a_time_limit_stops_the_run_at_the_first_step_past_it(tmp_path):
    config = load_config(TOY, [*TIMED, f"train.out_dir={tmp_path}", "train.name=timed"], "inversion")
    run_dir = plan_run_dir(config, False)
    run = train(config, run_dir, progress=False)
    records = read_metrics(run_dir / "metrics.jsonl")
    logged, evaluated = records[-2], records[-1]  # the last step is logged and evaluated, like a planned last one
    assert "eval/modes_covered" in evaluated and evaluated["step"] == logged["step"] == run.step < 100000
    assert 0.5 <= logged["train_s"] < 1.5  # past the limit by less than a step (and the machine's hiccups)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    assert checkpoint["step"] == run.step and checkpoint["seconds"] == logged["train_s"]
    assert (run_dir / "samples" / "final.png").is_file()
    # resuming a run that has used up its time trains nothing more
    again = train(config_of_run(run_dir), run_dir, resume=True, progress=False)
    assert again.step == run.step and load_checkpoint(run_dir / CHECKPOINT)["step"] == run.step


def test_a_resumed_run_continues_towards_the_same_time_limit(tmp_path, monkeypatch):
    config = load_config(TOY, [*TIMED, f"train.out_dir={tmp_path}", "train.name=timed"], "inversion")
    run_dir = plan_run_dir(config, False)
    original = Decomposed.step

    def crash_at_25(self, batch, step, log):
        if step == 24:
            raise KeyboardInterrupt
        return original(self, batch, step, log)

    monkeypatch.setattr(Decomposed, "step", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, progress=False)
    before = load_checkpoint(run_dir / CHECKPOINT)
    assert before["step"] == 20 and before["seconds"] < 0.5
    monkeypatch.setattr(Decomposed, "step", original)
    resumed = train(config_of_run(run_dir), run_dir, resume=True, progress=False)
    after = load_checkpoint(run_dir / CHECKPOINT)
    assert after["step"] == resumed.step > 20 and 0.5 <= after["seconds"] < 1.5  # the seconds of both parts
