"""Loggers (metrics.jsonl, TensorBoard, plugins) and checkpoint retention (last N, best by a metric)."""

import json

import pytest
import torch

from targetgen.errors import ConfigError, PluginError
from targetgen.training import CHECKPOINT, config_of_run, plan_run_dir, train
from targetgen.training.logs import logger_names
from targetgen.training.rundir import read_metrics


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_what_metrics_jsonl_gets(tiny_config):
    config = tiny_config("train.steps=6", "train.log_every=2", "train.loggers=auto", targets="standard")
    run_dir = plan_run_dir(config)
    train(config, run_dir, progress=False)
    records = read_metrics(run_dir / "metrics.jsonl")
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["loss/g_loss"]] == [2, 4, 6]
    assert [value for _, value in scalars["loss/g_loss"]] == pytest.approx([r["g_loss"] for r in records], rel=1e-6)
    assert set(scalars) >= {"loss/d_loss", "D/d_real", "D/d_fake", "perf/images_per_s", "perf/train_s"}


def test_tensorboard_shows_grouped_tags_sample_grids_the_config_and_hparams(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(
        "train.steps=4",
        "train.log_every=2",
        "train.sample_every=2",
        "evaluation.every=4",
        "evaluation.n=64",
        "train.loggers=tensorboard",
        targets="inversion",
    )
    run_dir = plan_run_dir(config)
    train(config, run_dir, progress=False)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {
        "loss/d_loss",
        "loss/regression_loss",
        "D/d_fake_before_inversion",
        "targets/target_reach",
        "perf/images_per_s",
        "eval/fid_digits",
    } <= set(tags["scalars"])
    assert [e.step for e in events.Images("samples")] == [2, 4, 4]  # every sample_every, and the final grid
    assert events.Images("samples")[0].width == 8 * 16 + 9 * 2  # 64 samples at 16 px, 8 per row, 2 px apart
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lambda1: " in text and "precision: fp32" in text
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    written = {
        value.tag
        for path in (run_dir / "tensorboard").glob("events*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    }
    assert {"_hparams_/session_start_info", "hparams/eval/fid_digits"} <= written  # the HPARAMS tab
    assert "hparams/eval/class_0_share" not in written


def test_a_logger_plugin_without_images_or_text_still_works():
    from targetgen.training.callbacks import WriteSamples
    from targetgen.training.logs import tensorboard_tag

    class NumbersOnly:
        def __init__(self):
            self.seen = []

        def log(self, step, values):
            self.seen.append(step)

        def close(self):
            pass

    logger = NumbersOnly()
    WriteSamples(None, 1, [logger])._show(torch.zeros(4, 1, 8, 8), 1)  # no log_images: nothing asked of it
    assert logger.seen == []
    assert [
        tensorboard_tag(k) for k in ("g_loss", "d_fake", "epoch", "lambda1", "eval/fid", "imle/match_distance")
    ] == ["loss/g_loss", "D/d_fake", "perf/epoch", "targets/lambda1", "eval/fid", "imle/match_distance"]


def test_a_resumed_run_hides_the_redone_tensorboard_steps(tiny_config):
    config = tiny_config("train.steps=6", "train.checkpoint_every=2", "train.loggers=tensorboard", targets="standard")
    run_dir = plan_run_dir(config)
    train(config, run_dir, progress=False)
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    checkpoint["step"], checkpoint["batch"] = 4, 4  # pretend the run stopped after step 4's checkpoint
    torch.save(checkpoint, run_dir / CHECKPOINT)
    train(config_of_run(run_dir), run_dir, resume=True, progress=False)
    steps = [step for step, _ in tensorboard_scalars(run_dir / "tensorboard")["loss/g_loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # 5 and 6 once, from the resumed run


def test_logger_names_and_plugins():
    assert logger_names("jsonl") == ["jsonl"]
    assert logger_names("auto") == ["jsonl", "tensorboard"]  # installed with the dev extra
    assert logger_names("tensorboard,jsonl") == ["jsonl", "tensorboard"]
    from targetgen.training.logs import check_loggers

    with pytest.raises(PluginError, match="train.loggers: unknown loggers plugin 'wandb'"):
        check_loggers("jsonl,wandb")


def checkpoint_steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_keep_checkpoints_keeps_the_last_n(tiny_config):
    config = tiny_config("train.steps=10", "train.checkpoint_every=2", "train.keep_checkpoints=3", targets="standard")
    run_dir = plan_run_dir(config)
    train(config, run_dir, progress=False)
    assert checkpoint_steps(run_dir) == ["last.pt", "step_000006.pt", "step_000008.pt", "step_000010.pt"]
    for name in ("step_000006.pt", "step_000008.pt"):
        assert torch.load(run_dir / "checkpoints" / name, weights_only=True)["step"] == int(name[5:11])
    last = torch.load(run_dir / CHECKPOINT, weights_only=True)
    newest = torch.load(run_dir / "checkpoints" / "step_000010.pt", weights_only=True)
    assert all(torch.equal(last["generator"][k], newest["generator"][k]) for k in last["generator"])


def test_best_checkpoint_by_an_evaluation_metric(tiny_config):
    config = tiny_config(
        "train.steps=12",
        "train.checkpoint_every=3",
        "evaluation.every=3",
        "evaluation.n=64",
        "train.best_metric=fid_digits",
        targets="standard",
    )
    run_dir = plan_run_dir(config)
    train(config, run_dir, progress=False)
    evaluations = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/fid_digits" in r]
    best = min(evaluations, key=lambda r: r["eval/fid_digits"])
    record = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert record == {"step": best["step"], "fid_digits": best["eval/fid_digits"]}
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["step"] == best["step"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (["train.best_metric=fid_digits"], "train.best_metric: needs in-run evaluation; set evaluation.every"),
        (
            ["train.best_metric=fid", "evaluation.every=2", "evaluation.n=64"],
            "train.best_metric: 'fid' is not among the evaluated metrics",
        ),
    ],
)
def test_best_metric_must_be_evaluated(tiny_config, settings, message):
    config = tiny_config("train.steps=4", *settings, targets="standard")
    with pytest.raises(ConfigError, match=message):
        train(config, plan_run_dir(config), progress=False)
