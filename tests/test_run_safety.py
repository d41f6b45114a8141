"""--overwrite that never loses a run, no symbolic link out of a run directory, resume that checks
the config it resumes, and stops by signal (SIGTERM like Ctrl-C; compare stops its children)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from cli_helpers import run_cli
from conftest import TINY

from targetgen.training import CHECKPOINT
from targetgen.training.checkpoint import load_checkpoint
from targetgen.training.rundir import REPLACED, read_metrics

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


def contents(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (but the lock) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def png_with_broken_pixels(path: Path) -> None:
    """A PNG whose chunks and checksums are all valid (PIL's verify() passes) but whose pixel data is not zlib."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0)  # 16×16, 8-bit grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib at all" * 4) + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- --overwrite


LATE_FAILURES = {
    # caught before the directory is touched now, and must stay harmless if it ever is not
    "best_metric": (
        ["--set", "train.best_metric=nonsense", "--set", "evaluation.every=1"],
        "train.best_metric: 'nonsense' is not among the evaluated metrics",
    ),
    "device": (["--device", "meta"], "train.device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
    # fails at the first batch, after the run directory was claimed
    "bad image": (
        ["--set", "data.name=folder", "--set", "data.path={images}", "--set", "data.channels=1"],
        "cannot decode image",
    ),
}


@pytest.mark.parametrize("case", LATE_FAILURES)
def test_overwrite_with_a_late_failure_keeps_the_old_run(tmp_path, case):
    run_dir = made_run(tmp_path, steps=3)
    before = contents(run_dir)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):  # a batch of 32 from a folder, one of them undecodable
        (images / f"{i:02d}.png").write_bytes((run_dir / "samples" / "final.png").read_bytes())
    png_with_broken_pixels(images / "00.png")
    args, message = LATE_FAILURES[case]
    code, _, err = cli_train(
        tmp_path,
        "--targets",
        "standard",
        "--steps",
        "5",
        "--name",
        "r",
        "--overwrite",
        *[a.replace("{images}", str(images)) for a in args],
    )
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert contents(run_dir) == before and not (run_dir / REPLACED).exists()


def test_overwrite_puts_the_old_run_back_after_any_failure_before_the_first_checkpoint(tmp_path, monkeypatch):
    run_dir = made_run(tmp_path, steps=3)
    before = contents(run_dir)
    from targetgen.errors import DivergenceError
    from targetgen.training import standard

    def diverges(self, batch, step, log):
        raise DivergenceError("D(x) is not finite")

    monkeypatch.setattr(standard.StandardGAN, "step", diverges)
    code, _, err = cli_train(tmp_path, "--targets", "standard", "--steps", "5", "--name", "r", "--overwrite")
    assert code == 2 and err.strip().splitlines() == [
        f"error: training diverged at step 1: D(x) is not finite; no checkpoint was written yet; "
        f"the previous run in {run_dir} was put back as it was"
    ]
    assert contents(run_dir) == before


def test_overwrite_deletes_the_old_run_once_the_new_one_has_checkpointed(tmp_path, monkeypatch):
    run_dir = made_run(tmp_path, steps=3)
    from targetgen.errors import DivergenceError
    from targetgen.training import standard

    real_step = standard.StandardGAN.step

    def diverges_late(self, batch, step, log):
        if step == 2:  # after the first checkpoint (every step here)
            raise DivergenceError("D(x) is not finite")
        return real_step(self, batch, step, log)

    monkeypatch.setattr(standard.StandardGAN, "step", diverges_late)
    code, _, err = cli_train(
        tmp_path,
        "--targets",
        "standard",
        "--steps",
        "5",
        "--name",
        "r",
        "--overwrite",
        "--set",
        "train.checkpoint_every=1",
    )
    assert code == 2 and "put back" not in err
    assert load_checkpoint(run_dir / CHECKPOINT)["step"] == 2 and not (run_dir / REPLACED).exists()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_command(tmp_path):
    run_dir = made_run(tmp_path, steps=3)
    before = contents(run_dir)
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
        str(tmp_path / "runs"),
        "--name",
        "r",
        "--overwrite",
        "--no-progress",
        *TINY_CLI,
        "--set",
        "train.checkpoint_every=100000",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    try:
        while not ((run_dir / REPLACED).is_dir() and (run_dir / "metrics.jsonl").exists()) and process.poll() is None:
            time.sleep(0.05)
        assert (run_dir / REPLACED / CHECKPOINT).is_file()  # the old run waits aside while the new one trains
    finally:
        process.kill()
        process.wait()
    assert (run_dir / REPLACED).is_dir()
    code, out, err = run_cli("sample", str(run_dir), "--out", str(tmp_path / "s.png"))  # reads the old run
    assert code == 0, err
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "4", "--no-progress")
    assert code == 0, err
    assert not (run_dir / REPLACED).exists()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert {
        k: v
        for k, v in contents(run_dir).items()
        if k in before and "metrics" not in k and "checkpoints" not in k and "config" not in k and "final" not in k
    } == {
        k: v
        for k, v in before.items()
        if "metrics" not in k and "checkpoints" not in k and "config" not in k and "final" not in k
    }


# ----------------------------------------------------------------------------- symbolic links


@pytest.mark.parametrize("entry", ["checkpoints", "samples", "tensorboard", ".lock", "metrics.jsonl"])
def test_nothing_is_written_through_a_symbolic_link_in_a_run_directory(tmp_path, entry):
    run_dir = made_run(tmp_path, "r", 2, "--set", "train.keep_checkpoints=2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_000001.pt").write_bytes(b"another run's checkpoint")
    (elsewhere / ".last.pt.tmp-1").write_bytes(b"another run's temporary file")
    (elsewhere / "last.pt").write_bytes(b"another run's last checkpoint")
    (elsewhere / "file").write_text("precious")
    target = run_dir / entry
    if target.is_dir():
        for item in target.iterdir():
            item.rename(elsewhere / item.name) if not (elsewhere / item.name).exists() else item.unlink()
        target.rmdir()
        target.symlink_to(elsewhere)
    else:
        target.unlink(missing_ok=True)
        target.symlink_to(elsewhere / "file")
    before = contents(elsewhere)
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "4", "--no-progress")
    assert code == 2 and "is a symbolic link" in err and "never writes" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert contents(elsewhere) == before


# ----------------------------------------------------------------------------- resume checks its config


@pytest.mark.parametrize("key, old, new", [("train.seed", 0, 7), ("regression.lr", 0.0002, 0.02)])
def test_resume_refuses_a_hand_edited_config(tmp_path, key, old, new):
    code, _, err = cli_train(tmp_path, "--targets", "inversion", "--steps", "2", "--name", "r")
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    text = (run_dir / "config.yaml").read_text()
    section, name = key.split(".")
    edited = text.replace(f"  {name}: {old}\n", f"  {name}: {new}\n", 1)
    assert edited != text
    (run_dir / "config.yaml").write_text(edited)
    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "4", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{key}: {old!r} in the checkpoint, {new!r} now" in err and "--allow-config-change" in err
    assert load_checkpoint(run_dir / CHECKPOINT)["step"] == 2

    code, _, err = run_cli("train", "--resume", str(run_dir), "--steps", "4", "--no-progress", "--allow-config-change")
    assert code == 0, err
    records = read_metrics(run_dir / "metrics.jsonl")
    change = next(r for r in records if "config_change" in r)
    assert change["step"] == 2 and change["config_change"] == {key: {"checkpoint": old, "now": new}}
    assert records[-1]["step"] == 4


def test_resume_may_change_length_and_cadence(tmp_path):
    run_dir = made_run(tmp_path, steps=2)
    code, _, err = run_cli(
        "train",
        "--resume",
        str(run_dir),
        "--steps",
        "4",
        "--no-progress",
        "--set",
        "train.log_every=2",
        "--set",
        "train.checkpoint_every=3",
    )
    assert code == 0, err
    code, _, err = run_cli(
        "train", "--resume", str(run_dir), "--steps", "5", "--no-progress", "--set", "evaluation.n=64"
    )
    assert code == 2 and "--set evaluation.n: a resumed run keeps its config" in err, err
    assert not any("config_change" in r for r in read_metrics(run_dir / "metrics.jsonl"))


# ----------------------------------------------------------------------------- signals


def _long_training(tmp_path, name="long", *extra):
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
        name,
        "--no-progress",
        *TINY_CLI,
        "--set",
        "train.checkpoint_every=5",
        *extra,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


def _stop(process: subprocess.Popen, signum: int) -> str:
    process.send_signal(signum)
    try:
        return process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def test_sigterm_stops_training_like_ctrl_c(tmp_path):
    process = _long_training(tmp_path)
    while not (tmp_path / "long" / CHECKPOINT).exists() and process.poll() is None:
        time.sleep(0.05)
    err = _stop(process, signal.SIGTERM)
    assert process.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: terminated; the last checkpoint (step "), err
    assert lines[0].endswith(f"is kept; continue with: targetgen train --resume {tmp_path / 'long'}")
    assert load_checkpoint(tmp_path / "long" / CHECKPOINT)["step"] >= 5


def _compare(out: Path, steps: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "targetgen.cli",
        "compare",
        "--targets",
        "standard",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--no-control",
        *TINY_CLI,
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "evaluation.every=100000",
        "--set",
        "evaluation.n=64",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


def _wait_for_child_checkpoint(out: Path, process: subprocess.Popen) -> Path:
    run_dir = out / "runs" / "standard-seed0"
    while not (run_dir / CHECKPOINT).exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    return run_dir


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


STEPS = 80


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_comparison_stops_its_training_and_the_next_one_resumes_it(tmp_path, signum):
    out = tmp_path / "c"
    process = _compare(out, STEPS)
    try:
        run_dir = _wait_for_child_checkpoint(out, process)
        children = _children(process.pid)
        assert children
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        assert process.returncode == (143 if signum == signal.SIGTERM else -9), err
        assert all(_gone(child) for child in children)  # no orphan keeps training (and holding the run's lock)
    finally:
        if process.poll() is None:
            process.kill()
    if signum == signal.SIGTERM:
        assert err.strip().splitlines()[-1].startswith("stopped: comparison terminated; its running trainings stopped")
    assert "stopped: terminated; the last checkpoint" in (out / "logs" / "standard-seed0.log").read_text()
    assert not (run_dir / "summary.json").exists()
    code, out_text, err = run_cli(
        "compare",
        "--targets",
        "standard",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--no-control",
        *TINY_CLI,
        "--set",
        f"train.steps={STEPS}",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "evaluation.every=100000",
        "--set",
        "evaluation.n=64",
    )
    assert code == 0, err
    assert "resumed from step" in out_text
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "d_loss" in r] == list(range(1, STEPS + 1))


def test_a_signal_during_a_comparison_stops_it_at_the_next_poll(tmp_path, monkeypatch):
    """compare's handlers only record a signal, so no exception can be lost in a finaliser; its loop stops
    every running training and says how to resume."""
    from rich.console import Console

    from targetgen import compare
    from targetgen.errors import Interrupted

    plan = compare.plan_comparison(
        None, tmp_path / "c", [*TINY, "train.steps=100000", "evaluation.every=0"], "standard", seeds=1, control=False
    )
    compare.write_plan(plan, "targetgen compare (test)")
    started = []
    real_popen = compare.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    real_sleep = time.sleep
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 3:
            signal.raise_signal(signal.SIGTERM)  # recorded by compare's handler, nothing raised here
        real_sleep(seconds)

    monkeypatch.setattr(compare.subprocess, "Popen", popen)
    monkeypatch.setattr(compare.time, "sleep", sleep)
    before = signal.getsignal(signal.SIGTERM)
    with open(tmp_path / "console.txt", "w") as printed, pytest.raises(Interrupted) as stopped:
        compare.run_plan(plan, jobs=1, console=Console(file=printed), progress=False)
    assert stopped.value.exit_code == 143 and "comparison terminated" in str(stopped.value)
    assert len(polls) == 3 and started and all(p.poll() is not None for p in started)
    assert signal.getsignal(signal.SIGTERM) is before
