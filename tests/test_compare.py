"""`targetgen compare`: planning (grid, controls), running, skipping, resuming, and the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from cli_helpers import run_cli
from rich.console import Console

from targetgen.compare import job_threads, plan_comparison, run_plan, write_plan
from targetgen.config import Config, from_dict
from targetgen.errors import ConfigError, PluginError
from targetgen.report import Group, headline, mean_se, write_report
from targetgen.training import callbacks as callbacks_module
from targetgen.training import train
from targetgen.training.builder import cpu_model

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
TOY = CONFIGS / "toy2d.yaml"
# toy2d, a few steps: every run is a subprocess of a few seconds
SHORT = [
    "train.steps=30",
    "train.batch_size=64",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.sample_every=1000",
    "evaluation.n=128",
    "evaluation.every=10",
    "data.num_points=500",
]


def labels(plan):
    return [c.label for c in plan.configurations]


# ----------------------------------------------------------------------------- planning


def test_control_added_exactly_when_inversion_lr_differs(tmp_path):
    plan = plan_comparison(TOY, tmp_path, ["regression.lr=0.0008", "targets.options.d_lr=0.0003"], "standard,inversion")
    assert labels(plan) == ["standard", "inversion", "standard G-lr=0.0008 (control)"]
    control = plan.configurations[2]
    assert control.control and control.source == "standard"
    assert control.settings["targets.options.g_lr"] == 0.0008
    assert control.settings["targets.options.d_lr"] == 0.0003  # the same discriminator as the inversion run

    assert labels(plan_comparison(TOY, tmp_path, ["regression.lr=0.0002"], "standard,inversion")) == [
        "standard",
        "inversion",
    ]
    assert labels(plan_comparison(TOY, tmp_path, ["regression.lr=0.0008"], "standard,inversion", control=False)) == [
        "standard",
        "inversion",
    ]
    # the baseline itself at lr 0.0008: nothing to control for
    assert labels(
        plan_comparison(
            TOY, tmp_path, ["regression.lr=0.0008"], "standard,inversion", grid=["targets.options.g_lr=0.0008"]
        )
    ) == ["standard g_lr=0.0008", "inversion"]
    # imle and nearest have no "standard at λ2" twin: no control for them
    assert labels(plan_comparison(TOY, tmp_path, ["regression.lr=0.0008"], "standard,imle")) == ["standard", "imle"]


def test_grid_points_apply_to_the_sources_that_have_their_keys(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "data: {name: toy2d}\n"
        "compare:\n"
        "  targets: standard,inversion,imle\n"
        "  seeds: 2\n"
        "  grid:\n"
        "    lambda1:\n"
        "      - {targets.options.lambda1: 0.5, regression.lr: 0.0004}\n"
        "      - {targets.options.lambda1: 1.0, regression.lr: 0.0002}\n"
    )
    plan = plan_comparison(config, tmp_path / "out", grid=["regression.loss={l1: 1.0},{l2: 1.0}"])
    assert labels(plan) == [
        "standard",
        "inversion lambda1=0.5 lr=0.0004 loss=l1",
        "inversion lambda1=0.5 lr=0.0004 loss=l2",
        "inversion lambda1=1 lr=0.0002 loss=l1",
        "inversion lambda1=1 lr=0.0002 loss=l2",
        "imle loss=l1",
        "imle loss=l2",
        "standard G-lr=0.0004 (control)",
    ]
    assert len(plan.runs) == 2 * len(plan.configurations)
    first = plan.runs[2]
    assert first.name == "inversion_lambda1=0.5_lr=0.0004_loss=l1-seed0"
    resolved = from_dict(Config, first.config)
    assert resolved.targets.options == {"lambda1": 0.5} and resolved.regression.lr == 0.0004
    assert resolved.regression.loss == {"l1": 1.0} and resolved.train.seed == 0
    assert [r.seed for r in plan.runs[:2]] == [0, 1]


@pytest.mark.parametrize(
    "overrides, grid, targets, message",
    [
        ([], ["targets.options.lamda1=0.5,1"], "standard,inversion", "applies to none of the sources"),
        ([], ["lambda1=0.5,1"], "inversion", "expected section.key=v1,v2"),
        ([], [], "standard,inversion,standard", "listed twice"),
        (["compare.seeds=0"], [], "inversion", r"compare.seeds: expected an integer in \[1, 1000\], got 0"),
        (
            ["compare.grid.mixed=[{targets.options.lambda1: 0.5}, {regression.lr: 0.001}]"],
            [],
            "inversion,imle",
            "points that apply to 'imle' and points that do not",
        ),
        ([], ["targets.options.lambda1=fast,1"], "inversion", "targets.options.lambda1: expected float"),
        (["compare.budget=seconds"], [], "inversion", "compare.budget: seconds needs train.max_seconds"),
        (
            ["compare.budget=minutes"],
            [],
            "inversion",
            "compare.budget: expected one of 'steps', 'seconds', got 'minutes'",
        ),
        (
            ["train.max_seconds=60"],
            [],
            "standard,inversion",
            "train.max_seconds: 60 would stop 'standard' by time while compare.budget is steps",
        ),
        (
            ["compare.budget=seconds", "train.max_seconds=60"],
            ["train.max_seconds=30,60"],
            "inversion",
            r"train.max_seconds: the grid gives configurations different limits \(30, 60\)",
        ),
    ],
)
def test_bad_plans_are_refused_before_anything_trains(tmp_path, overrides, grid, targets, message):
    with pytest.raises(ConfigError, match=message):
        plan_comparison(TOY, tmp_path, overrides, targets, grid=grid)
    assert not (tmp_path / "runs").exists()


def test_unknown_source_names_the_available_ones(tmp_path):
    with pytest.raises(PluginError, match="unknown targets plugin 'imlee'.*did you mean 'imle'"):
        plan_comparison(TOY, tmp_path, [], "standard,imlee")


def test_a_comparison_config_is_not_a_training_config(tmp_path):
    code, _, err = run_cli("train", "--config", "toy2d_compare")  # a shipped comparison template, by name
    assert code == 2 and "targetgen compare --config" in err


@pytest.mark.parametrize("name, runs", [("paper_fig2a", 21 + 1), ("paper_fig2b", 5 * (1 + 6 + 5))])
def test_paper_presets_plan_the_papers_experiments(tmp_path, name, runs):
    plan = plan_comparison(CONFIGS / "compare" / f"{name}.yaml", tmp_path)
    assert len(plan.runs) == runs
    for run in plan.runs:
        config = from_dict(Config, run.config)
        assert config.data.name == "celeba" and config.train.epochs == 10 and config.evaluation.features == "inception"
        if config.targets.name == "inversion" and name == "paper_fig2b":
            assert math.isclose(config.targets.options["lambda1"] * config.regression.lr, 0.0002)
        if config.targets.name == "inversion" and name == "paper_fig2a":
            o = config.targets.options
            assert math.isclose(o["lambda1"], 1 / o["steps"])
            assert math.isclose(config.regression.lr, 0.0002 / config.regression.steps)


@pytest.mark.parametrize(
    "path", ["experiments/digits_fig2b.yaml", "configs/compare/toy2d_compare.yaml", "experiments/ring8_compare.yaml"]
)
def test_reduced_presets_plan(tmp_path, path):
    plan = plan_comparison(ROOT / path, tmp_path)
    assert plan.compare.seeds == 5
    assert {c.source for c in plan.configurations} >= {"standard", "inversion", "imle", "nearest"}


def test_ring8_preset_gives_standard_and_inversion_the_same_learning_rates(tmp_path):
    plan = plan_comparison(ROOT / "experiments" / "ring8_compare.yaml", tmp_path)
    assert len(plan.runs) == 20 and not any(c.control for c in plan.configurations)
    first = {run.configuration.source: run.config for run in plan.runs if run.seed == 0}
    assert first["standard"]["targets"]["options"] == {"g_lr": 0.001, "d_lr": 0.001}
    assert first["inversion"]["targets"]["options"]["d_lr"] == 0.001 and first["inversion"]["regression"]["lr"] == 0.001


def _groups(means: dict[str, tuple[str, list[float]]]) -> list[Group]:
    return [
        Group(label, source, "(control)" in label, [{"metrics": {"fid": v}} for v in values])
        for label, (source, values) in means.items()
    ]


def test_the_headline_compares_the_best_with_the_best_tuned_standard():
    groups = _groups(
        {
            "standard": ("standard", [10.0, 12.0]),  # the tutorial's lr
            "standard g_lr=0.0008": ("standard", [5.0, 6.0]),  # the best standard: the one to beat
            "inversion": ("inversion", [4.0, 4.4]),
            "standard G-lr=0.001 (control)": ("standard", [7.0, 8.0]),
        }
    )
    assert headline(groups, "fid") == (
        "best fid: **inversion** 4.2 ± 0.2; vs best-tuned standard "
        "**standard g_lr=0.0008** 5.5 ± 0.5: 23.6 % lower, standard errors apart"
    )
    groups[1].summaries = [{"metrics": {"fid": v}} for v in (4.0, 5.0)]  # now within one standard error
    assert headline(groups, "fid").endswith("4.5 ± 0.5: 6.7 % lower, standard errors overlap")
    groups[3].summaries = [{"metrics": {"fid": v}} for v in (3.0, 3.2)]  # a control is best overall
    assert headline(groups, "fid") == (
        "best fid: **standard G-lr=0.001 (control)** 3.1 ± 0.1, a standard "
        "configuration; the best other, **inversion** 4.2 ± 0.2, vs it: 35.5 % higher, "
        "standard errors apart"
    )
    assert headline(_groups({"imle": ("imle", [3.0]), "nearest": ("nearest", [5.0])}), "fid") == "best fid: **imle** 3"


def test_mean_and_standard_error():
    mean, se = mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(se, 1 / math.sqrt(3))
    assert math.isnan(mean_se([5.0])[1])


# ----------------------------------------------------------------------------- running


def test_tiny_comparison_writes_the_report_and_skips_finished_runs(tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--config",
        str(TOY),
        "--targets",
        "standard,inversion",
        "--seeds",
        "2",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--no-progress",
        *[a for s in [*SHORT, "regression.lr=0.0008"] for a in ("--set", s)],
    ]
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    assert "3 configurations × 2 seeds = 6 runs" in stdout
    assert stdout.count("done ") == 6

    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["configuration"], r["seed"]) for r in rows) == sorted(
        (label, seed) for label in ("standard", "inversion", "standard G-lr=0.0008 (control)") for seed in ("0", "1")
    )
    for row in rows:  # equal budgets, real numbers
        # 500 points in batches of 64 (the last one 52): 30 steps = 3 epochs + 6 batches
        assert row["steps"] == "30" and row["images_seen"] == str(3 * 500 + 6 * 64)
        assert float(row["train_s"]) > 0 and 0 <= float(row["high_quality_share"]) <= 1
        assert row["cpu"] == cpu_model()
        assert math.isfinite(float(row["fid_pixels"]))
    report = (out / "report.md").read_text()
    assert "## fid_pixels (lower is better)" in report and "standard G-lr=0.0008 (control)" in report
    assert (
        "| configuration | fid_pixels | kid_pixels | modes_covered | high_quality_share | precision |" in report
    )  # overview
    assert report.count("**") >= 2  # a best cell per table
    assert "Equal budget: **steps**" in report
    assert "targetgen compare --config" in report  # the exact command
    for png in ("curves.png", "samples.png"):
        assert (out / png).stat().st_size > 10_000
    summary = out / "runs" / "inversion-seed1" / "summary.json"
    assert json.loads(summary.read_text())["metrics"]["fid_pixels"] == pytest.approx(
        float(next(r for r in rows if r["run"] == "inversion-seed1")["fid_pixels"])
    )

    before = summary.stat().st_mtime_ns
    code, stdout, _ = run_cli(*args)
    assert code == 0 and "6 of 6 runs already finished: skipped" in stdout and "done " not in stdout
    assert summary.stat().st_mtime_ns == before

    # the same folder with a different plan is refused, naming what changed
    code, _, stderr = run_cli(*[a if a != "train.steps=30" else "train.steps=40" for a in args])
    assert code == 2 and "planned differently (train.steps: 30 there, 40 now)" in stderr


def test_a_seconds_budget_gives_every_run_the_same_training_time(tmp_path):
    out = tmp_path / "cmp"
    timed = [
        *SHORT,
        "train.steps=100000",
        "train.max_seconds=0.5",
        "train.log_every=100000",
        "train.checkpoint_every=100000",
        "evaluation.every=100000",
        "compare.budget=seconds",
    ]
    code, stdout, stderr = run_cli(
        "compare",
        "--config",
        str(TOY),
        "--targets",
        "standard,inversion",
        "--out",
        str(out),
        "--no-progress",
        "--no-control",
        *[a for s in timed for a in ("--set", s)],
    )
    assert code == 0, stderr
    assert "2 configurations × 1 seeds = 2 runs (0.5 s of training each)" in stdout
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # each stopped at the first step past 0.5 s, with its final evaluation
        assert 0.5 <= float(row["train_s"]) < 1.5 and 0 < int(row["steps"]) < 100000, row
        assert math.isfinite(float(row["high_quality_share"]))
    report = (out / "report.md").read_text()
    assert "Equal budget: **training time**. Every run trained for 0.5 s of training steps" in report
    assert "Reached their step cap" not in report


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    plan = plan_comparison(TOY, out, SHORT, "inversion")
    write_plan(plan, "targetgen compare (test)")
    run = plan.runs[0]

    # Train it in-process and "crash" right after the checkpoint at step 10.
    save = callbacks_module.save

    def save_then_crash(run_, path, pos, order):
        save(run_, path, pos, order)
        raise KeyboardInterrupt

    monkeypatch.setattr(callbacks_module, "save", save_then_crash)
    config = from_dict(Config, run.config)
    plan.run_dir(run).mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        train(config, plan.run_dir(run), progress=False)
    monkeypatch.setattr(callbacks_module, "save", save)

    with open(tmp_path / "console.txt", "w") as printed:
        outcome = run_plan(plan, jobs=1, console=Console(file=printed), progress=False)
    assert not outcome.failed and len(outcome.finished) == 1
    summary = outcome.finished[0]
    assert summary["resumed_from"] == 10 and summary["steps"] == 30
    assert summary["cpu"] == cpu_model()  # the machine its train_s and wall_s were measured on
    assert "resuming from step 10" in (out / "logs" / f"{run.name}.log").read_text()
    steps = [json.loads(line)["step"] for line in (plan.run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    # a log line every 5 steps, an evaluation every 10: nothing before step 10 repeated, nothing lost
    assert steps == [5, 10, 10, 15, 20, 20, 25, 30, 30]
    write_report(out)
    assert (out / "results.csv").read_text().count("\n") == 2


def test_jobs_are_spread_over_the_given_devices(tmp_path):
    """Fake device names on CPU: each job is told its GPU through CUDA_VISIBLE_DEVICES (torch then sees none)."""
    out = tmp_path / "cmp"
    plan = plan_comparison(TOY, out, [*SHORT, "train.steps=10", "evaluation.every=0"], "standard", seeds=4)
    write_plan(plan, "targetgen compare (test)")
    with open(tmp_path / "console.txt", "w") as printed:
        outcome = run_plan(plan, jobs=2, console=Console(file=printed), progress=False, devices=["gpu-a", "gpu-b"])
    assert not outcome.failed and len(outcome.finished) == 4
    seen = [
        (out / "logs" / f"{r.name}.log").read_text().splitlines()[0].split(" on ")[1].split(":")[0] for r in plan.runs
    ]
    assert seen[:2] == ["CUDA_VISIBLE_DEVICES=gpu-a", "CUDA_VISIBLE_DEVICES=gpu-b"]  # two jobs, one per device
    assert set(seen) == {"CUDA_VISIBLE_DEVICES=gpu-a", "CUDA_VISIBLE_DEVICES=gpu-b"}


def test_job_devices_come_from_the_option_or_the_environment(monkeypatch):
    from targetgen.compare import job_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert job_devices("0, 1") == ["0", "1"] and job_devices(None) == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert job_devices(None) == []  # no GPU here: jobs are not told anything


def test_d_steps_is_a_grid_key_of_every_source(tmp_path):
    plan = plan_comparison(TOY, tmp_path, SHORT, "standard,inversion", grid=["targets.d_steps=1,2"])
    assert labels(plan) == ["standard d_steps=1", "standard d_steps=2", "inversion d_steps=1", "inversion d_steps=2"]


@pytest.mark.parametrize(
    "environ, jobs, expected",
    [
        ({}, 1, 2),
        ({}, 2, 1),
        ({}, 4, 1),  # the 2 cores shared among the jobs
        ({"OMP_NUM_THREADS": "1"}, 1, 1),  # a smaller count the user set stays ...
        ({"MKL_NUM_THREADS": "1"}, 1, 1),
        ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "2"}, 1, 1),  # ... whichever variable holds it
        ({"OMP_NUM_THREADS": "8"}, 1, 2),  # a larger one does not oversubscribe
        ({"OMP_NUM_THREADS": "0", "MKL_NUM_THREADS": "x"}, 1, 2),  # unusable values are ignored
    ],
)
def test_job_threads_one_count_for_both_variables(environ, jobs, expected):
    assert job_threads(environ, jobs, cores=2) == expected
