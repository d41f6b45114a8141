"""Never lose work: safe run names and --overwrite, resume that refuses what it cannot do,
the divergence guard for every strategy, torn logs, the lock, and checkpoints that do not fit."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from conftest import TINY

from targetgen.errors import CheckpointError, DivergenceError, RunDirectoryError
from targetgen.training import CHECKPOINT, config_of_run, plan_run_dir, train
from targetgen.training.checkpoint import load_checkpoint
from targetgen.training.rundir import read_metrics, run_lock

TINY_CLI = [arg for pair in (("--set", o) for o in TINY) for arg in pair]


def cli_train(tmp_path, *args):
    return run_cli("train", "--out-dir", str(tmp_path / "runs"), "--no-progress", *TINY_CLI, *args)


def made_run(tmp_path, name="r", steps=2, *args):
    code, _, err = cli_train(
        tmp_path,
        "--targets",
        "standard",
        "--steps",
        str(steps),
        "--name",
        name,
        "--set",
        "train.checkpoint_every=1",
        *args,
    )
    assert code == 0, err
    return tmp_path / "runs" / name


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- names and --overwrite


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs/path", "../x", ""])
def test_a_run_name_is_one_folder_name(tmp_path, name):
    keep = made_run(tmp_path, "keep")
    before = snapshot(tmp_path)
    code, _, err = cli_train(tmp_path, "--targets", "standard", "--steps", "1", "--name", name, "--overwrite")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: train.name: expected one folder name (no '/', not '.' or '..', not an "
        f"absolute path), got {name!r}; use --out-dir to choose where run directories go"
    ]
    assert snapshot(tmp_path) == before and (keep / CHECKPOINT).is_file()


def test_overwrite_refuses_a_symlink_pointing_outside(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.tex").write_text("years of work")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(outside)
    code, _, err = cli_train(tmp_path, "--targets", "standard", "--steps", "1", "--name", "link", "--overwrite")
    assert code == 2 and "is a symbolic link" in err and "Traceback" not in err
    assert (outside / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "runs" / "data"
    folder.mkdir(parents=True)
    (folder / "images.npz").write_text("not a run")
    code, _, err = cli_train(tmp_path, "--targets", "standard", "--steps", "1", "--name", "data", "--overwrite")
    assert code == 2 and "is not a targetgen run directory" in err and "nothing was deleted" in err
    assert (folder / "images.npz").read_text() == "not a run"


def test_a_bad_value_with_overwrite_deletes_nothing(tmp_path):
    run_dir = made_run(tmp_path)
    before = snapshot(run_dir)
    for bad in ("regression.lr=-1", "targets.options.d_lr=-1", "model.ngf=0", "train.batch_size=5000"):
        code, _, err = cli_train(
            tmp_path, "--targets", "standard", "--steps", "1", "--name", "r", "--overwrite", "--set", bad
        )
        assert code == 2 and "Traceback" not in err, err
        assert snapshot(run_dir) == before
        assert load_checkpoint(run_dir / CHECKPOINT)["step"] == 2


def test_overwrite_replaces_a_run_only_once_everything_is_built(tmp_path):
    run_dir = made_run(tmp_path, steps=3)
    (run_dir / "samples" / "extra.png").write_bytes(b"x")
    code, _, err = cli_train(tmp_path, "--targets", "standard", "--steps", "1", "--name", "r", "--overwrite")
    assert code == 0, err
    assert not (run_dir / "samples" / "extra.png").exists()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]


def test_a_failed_validation_leaves_no_directory(tmp_path):
    code, _, err = cli_train(
        tmp_path,
        "--targets",
        "standard",
        "--name",
        "new",
        "--set",
        "data.name=folder",
        "--set",
        f"data.path={tmp_path}/missing",
    )
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "runs" / "new").exists()


def test_out_dir_that_is_a_file_or_read_only_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(
        "train", "--out-dir", str(tmp_path / "file"), "--targets", "standard", "--steps", "1", *TINY_CLI
    )
    assert code == 2 and err.strip().splitlines() == [
        f"error: --out-dir {tmp_path / 'file'} is a file, not a folder; choose a folder for run directories"
    ]


def test_a_read_only_out_dir_is_one_line(tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anyway: refuse the write as the kernel would
        real_mkdir = Path.mkdir

        def refused(self, *args, **kwargs):
            if str(self).startswith(str(read_only)):
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refused)
    code, _, err = run_cli(
        "train", "--out-dir", str(read_only / "runs"), "--targets", "standard", "--steps", "1", *TINY_CLI
    )
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot create the run directory {read_only / 'runs'}")
    assert lines[0].endswith(": Permission denied")


# ----------------------------------------------------------------------------- resume


def test_resume_without_a_checkpoint_is_an_error_not_a_restart(tmp_path):
    run_dir = made_run(tmp_path, steps=4)
    (run_dir / CHECKPOINT).unlink()
    log = (run_dir / "metrics.jsonl").read_text()
    code, _, err = run_cli("train", "--resume", str(run_dir), "--no-progress")
    assert code == 2 and "has no checkpoint" in err and "--overwrite" in err
    assert (run_dir / "metrics.jsonl").read_text() == log


def test_resume_cannot_shorten_a_run(tmp_path):
    run_dir = made_run(tmp_path, steps=4)
    config = (run_dir / "config.yaml").read_text()
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "2", "--no-progress")
    assert code == 2
    assert err.strip() == (
        "error: train.steps: 2 gives 2 steps, fewer than the checkpoint's 4; a resumed run can only be extended"
    )
    assert (run_dir / "config.yaml").read_text() == config


def test_a_torn_last_log_line_is_dropped_on_resume(tiny_config):
    config = tiny_config("train.steps=4", "train.checkpoint_every=2", targets="standard")
    run_dir = plan_run_dir(config)
    train(config, run_dir, progress=False)
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 5, "d_lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    train(config_of_run(run_dir, ["train.steps=6"]), run_dir, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "metrics.jsonl").read_text().endswith("}\n")


def test_a_broken_line_inside_the_log_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(path)


def test_an_orphaned_temporary_checkpoint_is_removed(tmp_path):
    run_dir = made_run(tmp_path, steps=2)
    orphan = run_dir / "checkpoints" / ".last.pt.tmp-999999"
    orphan.write_bytes(b"half a checkpoint")
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "3", "--no-progress")
    assert code == 0, err
    assert not orphan.exists()


# ----------------------------------------------------------------------------- checkpoints that do not fit


@pytest.mark.parametrize("case", ["empty", "tensor", "newer", "other source", "shape"])
def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, case):
    run_dir = made_run(tmp_path, steps=2)
    path = run_dir / CHECKPOINT
    state = torch.load(path, weights_only=True)
    message = {
        "empty": "is empty (0 bytes)",
        "tensor": "is not a targetgen checkpoint (it holds a Tensor; expected a dict of format 2)",
        "newer": "has format 99; this targetgen reads formats 1 to 2: upgrade targetgen to resume it",
        "other source": "was written by target source 'imle'; this run's config uses 'standard'",
        "shape": "does not fit this run's networks or optimisers: Error(s) in loading state_dict for Generator",
    }[case]
    if case == "empty":
        path.write_bytes(b"")
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "newer":
        torch.save({**state, "format": 99}, path)
    elif case == "other source":
        torch.save({**state, "targets": "imle"}, path)
    else:
        torch.save({**state, "generator": {k: torch.zeros(2) for k in state["generator"]}}, path)
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "3", "--no-progress")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "weights_only" not in err


def test_a_malicious_checkpoint_never_runs(tmp_path):
    run_dir = made_run(tmp_path, steps=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 2, "payload": Evil()}, run_dir / CHECKPOINT)
    for command in (
        ["sample", str(run_dir), "--out", str(tmp_path / "s.png")],
        ["train", "--resume", str(run_dir), "--steps", "3", "--no-progress"],
    ):
        code, _, err = run_cli(*command)
        assert code == 2 and "which targetgen never unpickles" in err and "weights_only" not in err, err
    assert not marker.exists()


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny_config, monkeypatch):
    config = tiny_config("train.steps=4", "train.checkpoint_every=2", targets="standard")
    run_dir = plan_run_dir(config)
    from targetgen.training import checkpoint as checkpoint_module

    real_save = checkpoint_module.torch.save
    calls = []

    def fills_the_disk(obj, f):
        calls.append(obj["step"])
        if obj["step"] == 4:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: file "
                "write failed"
            )
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", fills_the_disk)
    with pytest.raises(
        CheckpointError,
        match=r"cannot write checkpoint .*last.pt \(\[enforce fail.*\); the previous checkpoint is intact",
    ):
        train(config, run_dir, progress=False)
    assert load_checkpoint(run_dir / CHECKPOINT)["step"] == 2
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------- divergence


def all_finite(state):
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return bool(torch.isfinite(state).all())
    return True


@pytest.mark.parametrize(
    "targets, setting",
    [
        ("standard", "targets.options.g_lr=1e30"),
        ("standard", "targets.options.d_lr=1e30"),
        ("inversion", "targets.options.d_lr=1e30"),
        ("inversion", "regression.lr=1e30"),
        ("imle", "regression.lr=1e30"),
        ("nearest", "regression.lr=1e30"),
    ],
)
def test_divergence_stops_in_one_line_and_every_checkpoint_is_finite(tmp_path, targets, setting):
    code, _, err = cli_train(
        tmp_path,
        "--targets",
        targets,
        "--steps",
        "30",
        "--name",
        "boom",
        "--set",
        setting,
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "targets.options.samples_factor=1" if targets == "imle" else "train.log_every=1",
    )
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step "), err
    checkpoint = tmp_path / "runs" / "boom" / CHECKPOINT
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        assert all_finite(state) and f"step {state['step']}) is finite and kept" in lines[0]
    else:
        assert "no checkpoint was written yet" in lines[0]


def test_divergence_in_a_network_output_names_it(tiny_config, monkeypatch):
    from targetgen.plugins.inversion import DiscriminatorInversion

    config = tiny_config("train.steps=5", "train.checkpoint_every=1")
    original = DiscriminatorInversion.update_discriminator

    def poisoned(self, real, fake, step=0):
        if self.optimizerD.state and len(self.optimizerD.state) and poisoned.calls == 2:
            with torch.no_grad():
                next(self.plain_netD.parameters()).fill_(float("nan"))
        poisoned.calls += 1
        return original(self, real, fake, step)

    poisoned.calls = 0
    monkeypatch.setattr(DiscriminatorInversion, "update_discriminator", poisoned)
    with pytest.raises(
        DivergenceError,
        match=r"^training diverged at step 3: D\(x\) is not finite; the last checkpoint "
        r"\(.*, step 2\) is finite and kept$",
    ):
        train(config, plan_run_dir(config), progress=False)


# ----------------------------------------------------------------------------- one writer per run


def test_the_lock_refuses_a_second_process_and_is_free_once_it_is_gone(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from targetgen.training.rundir import run_lock\n"
                f"with run_lock(Path({str(folder)!r}), 'targetgen train'):\n"
                "    print('locked', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(
                RunDirectoryError,
                match=rf"{folder} is in use by process {holder.pid} on .* \(targetgen "
                r"train, started .*\); wait for it to finish or stop it",
            ),
            run_lock(folder),
        ):
            pass
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    with run_lock(folder, "test"):  # a lock whose process is gone is taken over
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


def interrupt(process: subprocess.Popen) -> str:
    """Ctrl-C to ``process``; its stderr once it has exited. A process that outlives a minute is killed,
    so that a failing test never leaves a 100,000-step run behind on the machine."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def test_two_trainings_into_one_run_directory(tmp_path):
    """The second of two processes is refused, with --overwrite too; the first trains on undisturbed."""
    command = [
        sys.executable,
        "-m",
        "targetgen.cli",
        "train",
        "--targets",
        "standard",
        "--steps",
        "100000",
        "--out-dir",
        str(tmp_path),
        "--name",
        "same",
        "--no-progress",
        *TINY_CLI,
        "--set",
        "train.checkpoint_every=5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (tmp_path / "same" / "config.yaml").exists() and first.poll() is None:
            time.sleep(0.05)
        for extra in ([], ["--overwrite"]):
            second = subprocess.run([*command, *extra], capture_output=True, text=True, env=env, timeout=120)
            assert second.returncode == 2, second.stderr
            assert (
                f"is in use by process {first.pid} on " in second.stderr
                and "(targetgen train, started" in second.stderr
            )
        assert first.poll() is None
    finally:
        interrupt(first)
    steps = [r["step"] for r in read_metrics(tmp_path / "same" / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 5


def test_a_ctrl_c_whose_exception_was_swallowed_still_stops_training(tmp_path):
    """A KeyboardInterrupt raised inside a finaliser is printed and dropped by Python; the loop must
    still stop at its next step, with the usual one-line message."""
    from targetgen.config import load_config
    from targetgen.training import trainer

    class SwallowsCtrlC:  # what Python does to an exception raised in __del__
        def __del__(self):
            with contextlib.suppress(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    config = load_config(
        None, [*TINY, "train.steps=50", f"train.out_dir={tmp_path}", "train.name=swallowed"], "standard"
    )
    with pytest.MonkeyPatch.context() as patch:
        real_check = trainer._check_step

        def check_then_swallow(run, stats, step, *args, **kwargs):
            if step == 3:
                SwallowsCtrlC()  # dropped at once: its __del__ runs here
            return real_check(run, stats, step, *args, **kwargs)

        patch.setattr(trainer, "_check_step", check_then_swallow)
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "swallowed")
    assert [r["step"] for r in read_metrics(tmp_path / "swallowed" / "metrics.jsonl")][-1] == 3
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_sigterm_swallowed_while_the_run_directory_is_claimed_stops_before_the_first_step(tmp_path):
    """SIGTERM keeps its default (the process ends) until training owns a run directory; from then on it is
    remembered, so one whose exception is lost on the way (inside an import, a finaliser) still stops the run
    before its first step, and an --overwrite puts the old run back."""
    from targetgen.config import load_config
    from targetgen.errors import Terminated
    from targetgen.training import trainer

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # else training would not install its handler
    config = load_config(None, [*TINY, "train.steps=3", f"train.out_dir={tmp_path}", "train.name=claimed"], "standard")
    train(config, tmp_path / "claimed")
    before = (tmp_path / "claimed" / CHECKPOINT).read_bytes()
    real_claim = trainer._claim

    def claim_then_swallow(*args, **kwargs):
        replacement = real_claim(*args, **kwargs)
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # (raising it now would end pytest)
        with contextlib.suppress(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        return replacement

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "_claim", claim_then_swallow)
        with pytest.raises(Terminated):
            train(config, tmp_path / "claimed", overwrite=True)
    assert (tmp_path / "claimed" / CHECKPOINT).read_bytes() == before  # the old run, put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_says_how_to_resume(tmp_path):
    command = [
        sys.executable,
        "-m",
        "targetgen.cli",
        "train",
        "--targets",
        "standard",
        "--steps",
        "100000",
        "--out-dir",
        str(tmp_path),
        "--name",
        "long",
        "--no-progress",
        *TINY_CLI,
        "--set",
        "train.checkpoint_every=5",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    while not (tmp_path / "long" / CHECKPOINT).exists() and process.poll() is None:
        time.sleep(0.05)
    err = interrupt(process)
    assert process.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: interrupted; the last checkpoint (step ")
    assert lines[0].endswith(f"is kept; continue with: targetgen train --resume {tmp_path / 'long'}")


# ----------------------------------------------------------------------------- sampling needs no data


def test_sampling_a_run_needs_no_training_data(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    code, _, err = cli_train(
        tmp_path,
        "--name",
        "folder",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--set",
        "data.name=folder",
        "--set",
        f"data.path={images}",
        "--set",
        "data.channels=3",
        "--set",
        "regression.ema=0.5",
    )
    assert code == 0, err
    images.rename(tmp_path / "moved")
    code, _, err = run_cli("sample", str(tmp_path / "runs" / "folder"), "--n", "4", "--out", str(tmp_path / "s.png"))
    assert code == 0, err
    assert Image.open(tmp_path / "s.png").size == (2 * 18 + 2, 2 * 18 + 2)


def test_the_sampled_generator_is_the_runs_sampling_generator(tiny_config):
    from targetgen.training import load_generator

    config = tiny_config("train.steps=3", "regression.ema=0.5")
    run = train(config, plan_run_dir(config), progress=False)
    trained = load_generator(plan_run_dir(config, overwrite=True))
    z = torch.randn(6, *trained.latent_shape)
    from targetgen.samples import generate

    expected = generate(run.strategy.sampling_generator(), z)
    assert run.strategy.sampling_generator() is not run.generator  # the EMA copy, not the trained network
    assert torch.equal(generate(trained.sampling_generator, z), expected) and trained.step == 3


def test_two_comparisons_in_one_folder(tmp_path):
    out = tmp_path / "cmp"
    command = [
        sys.executable,
        "-m",
        "targetgen.cli",
        "compare",
        "--out",
        str(out),
        "--targets",
        "standard",
        "--no-progress",
        *[a for o in [*TINY, "train.steps=100000"] for a in ("--set", o)],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (out / "plan.json").exists() and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: {out} is in use by process {first.pid} on {json.loads((out / '.lock').read_text())['host']} "
            f"(targetgen compare, started {json.loads((out / '.lock').read_text())['started']}); "
            "wait for it to finish or stop it"
        ]
    finally:
        interrupt(first)


def test_the_command_line_is_checked_before_torch_is_imported():
    """`targetgen --help` and config validation do not wait for torch (seconds on a cold start)."""
    probe = (
        "import sys; from targetgen.cli import main; from targetgen.config import load_config; "
        "from targetgen.training.rundir import planned_run_dir; load_config('configs/digits.yaml'); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "False", result.stderr
