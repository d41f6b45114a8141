"""targetgen tune: search spaces, Optuna studies in SQLite shared by workers, a killed worker's trial retried
and its run resumed, the best-of-k report and the confirmation."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli

pytest.importorskip("optuna")

BASE = {
    "data": {"image_size": 16},
    "model": {"nz": 8, "ngf": 8, "ndf": 8},
    "train": {
        "batch_size": 32,
        "steps": 4,
        "loggers": "jsonl",
        "precision": "fp32",
        "channels_last": False,
        "threads": 1,
        "checkpoint_every": 2,
        "log_every": 2,
        "sample_every": 1000,
    },
    "evaluation": {"every": 4, "n": 64},
}
FAMILIES = {
    "standard": {
        "targets": "standard",
        "space": {"targets.options.g_lr": {"log_uniform": [1.0e-4, 1.0e-2]}, "targets.d_steps": {"int": [1, 2]}},
    },
    "inversion": {
        "targets": "inversion",
        "set": {"targets.options.step_rule": "normalized"},
        "space": {
            "targets.options.lambda1": {"log_uniform": [0.05, 2.0]},
            "discriminator.r1": {"categorical": [0.0, 0.01]},
            "discriminator.reg_every": {"int": [1, 4], "when": {"discriminator.r1": 0.01}},
        },
    },
}


def space_file(tmp_path, trials=3, families=FAMILIES, **tune):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"tune": {"trials": trials, **tune}, **BASE, "families": families}))
    return path


def trials_of(out: Path) -> list[tuple[str, int, str]]:
    """(study, trial number, state) of every trial in the study database."""
    with sqlite3.connect(out / "study.db") as db:
        return db.execute(
            "SELECT studies.study_name, trials.number, trials.state FROM trials JOIN studies "
            "ON trials.study_id = studies.study_id ORDER BY 1, 2"
        ).fetchall()


def test_a_study_tries_every_family_equally_starting_from_its_default(tmp_path):
    out = tmp_path / "t"
    code, text, err = run_cli("tune", "-c", str(space_file(tmp_path, trials=2)), "--out", str(out), "--jobs", "2")
    assert code == 0, err
    assert "2 families × 2 trials (random search, equal steps)" in text
    assert [state for _, _, state in trials_of(out)] == ["COMPLETE"] * 4
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"{f}-t00{i}" for f in ("inversion", "standard") for i in range(2)
    ]
    first = yaml.safe_load((out / "configs" / "standard-t000.yaml").read_text())
    assert first["targets"]["options"] == {"g_lr": 0.0002} and first["targets"]["d_steps"] == 1  # the default
    report = (out / "tune_report.md").read_text()
    assert "## standard" in report and "| 0 (default) |" in report and "expected best" in report
    assert (out / "tune_curves.png").is_file()
    # re-running continues the study to --trials; --confirm reruns each family's best with seeds
    code, text, err = run_cli(
        "tune",
        "-c",
        str(space_file(tmp_path, trials=2)),
        "--out",
        str(out),
        "--trials",
        "3",
        "--confirm",
        "1",
        "--jobs",
        "2",
        "--no-progress",
    )
    assert code == 0 and "2 trials done" in text, err
    assert len(trials_of(out)) == 6
    confirmed = (out / "confirm" / "report.md").read_text()
    assert "standard (best of 3)" in confirmed and "inversion (best of 3)" in confirmed
    assert sorted(p.name for p in (out / "confirm" / "runs").iterdir()) == [
        "inversion-best-seed0",
        "standard-best-seed0",
    ]
    code, text, err = run_cli("report", str(out))
    assert code == 0 and "tune_report.md" in text, err


def test_best_of_k_is_the_expected_minimum_of_k_draws():
    from targetgen.tune import best_of_k

    curve = best_of_k([5.0, 1.0, 3.0], lower=True, draws=4000)
    assert curve[0][0] == 3.0  # the median of one draw
    assert curve[2][0] == 1.0 and curve[2][2] <= 3.0  # with three draws, most often the best one
    assert [c[0] for c in best_of_k([5.0, 1.0, 3.0], lower=False)] == [3.0, 5.0, 5.0]
    medians = [c[0] for c in best_of_k(list(range(20)), lower=True)]
    assert medians == sorted(medians, reverse=True)  # more trials never expect worse


def test_two_workers_on_one_study_share_it_without_losing_or_repeating_a_trial(tmp_path):
    out = tmp_path / "t"
    path = space_file(tmp_path, trials=3, families={"standard": FAMILIES["standard"]})
    command = [sys.executable, "-m", "targetgen.cli", "tune", "-c", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [*command, "--worker", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    done = [line for text, _ in outputs for line in text.splitlines() if line.startswith("done standard trial")]
    assert all("done standard trial" in text for text, _ in outputs)  # both contributed
    states = trials_of(out)
    assert [s for _, _, s in states if s == "COMPLETE"] == ["COMPLETE"] * 3
    numbers = [int(line.split("trial ")[1].split(":")[0]) for line in done]
    assert len(numbers) == len(set(numbers)) == 3  # none run twice, none lost
    assert len({yaml.safe_load(p.read_text())["targets"]["options"]["g_lr"] for p in (out / "configs").iterdir()}) == 3
    recorded = (out / "command.txt").read_text().splitlines()  # each worker's command, once
    assert sorted(line.split()[-1] for line in recorded) == ["0", "1"] and len(recorded) == 2
    assert "--worker 0" in (out / "tune_report.md").read_text()


def test_submitit_workers_share_the_study_and_list_choices_reach_the_config(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "t"
    standard = {
        "targets": "standard",
        "space": {"targets.options.betas": {"categorical": [[0.5, 0.999], [0.0, 0.99]]}},
    }
    path = space_file(tmp_path, trials=3, families={"standard": standard})
    code, text, err = run_cli(
        "tune", "-c", str(path), "--out", str(out), "--executor", "submitit", "--cluster", "local", "--workers", "2"
    )
    assert code == 0, err
    assert "3 trials done, 0 failed, 0 pruned" in text
    assert [s for _, _, s in trials_of(out)] == ["COMPLETE"] * 3
    betas = [yaml.safe_load(p.read_text())["targets"]["options"]["betas"] for p in sorted((out / "configs").iterdir())]
    assert betas[0] == [0.5, 0.999] and all(b in ([0.5, 0.999], [0.0, 0.99]) for b in betas)  # the default first
    from targetgen.tune import results

    stored = [t["params"]["targets.options.betas"] for t in results(out)[0].trials]
    assert sorted(stored) == sorted(betas)  # read back as lists, as the confirmation's configs need them
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2  # two jobs ran


def test_a_killed_worker_leaves_a_failed_trial_that_the_next_retries_resuming_its_run(tmp_path):
    out = tmp_path / "t"
    base = dict(
        BASE,
        train={**BASE["train"], "steps": 400, "checkpoint_every": 20, "log_every": 20},
        evaluation={"every": 400, "n": 64},
    )
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tune": {"trials": 2, "heartbeat_s": 1, "grace_s": 3},
                **base,
                "families": {"standard": FAMILIES["standard"]},
            }
        )
    )
    command = [sys.executable, "-m", "targetgen.cli", "tune", "-c", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (out / "runs" / "standard-t000" / "checkpoints" / "last.pt").exists():
            assert worker.poll() is None, worker.communicate()
            time.sleep(0.1)
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert [s for _, _, s in trials_of(out)] == ["RUNNING"]  # until someone sees it is stale
    code, text, err = run_cli("tune", "-c", str(path), "--out", str(out))
    assert code == 0, err
    states = [s for _, _, s in trials_of(out)]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"], states  # the killed trial, its retry, the second trial
    log = (out / "logs" / "standard-t000.log").read_text()
    assert "--resume" in log and "resuming" in log  # the retry continued the killed run from its checkpoint
    report = (out / "tune_report.md").read_text()
    assert "2 trials (0 failed)" in report


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {
                "families": {
                    "standard": {"targets": "standard", "space": {"targets.options.g_lr": {"log_unifrom": [1, 2]}}}
                }
            },
            "unknown distribution 'log_unifrom'; did you mean 'log_uniform'?",
        ),
        (
            {
                "families": {
                    "standard": {"targets": "standard", "space": {"targets.options.g_lr": {"log_uniform": [0, 1]}}}
                }
            },
            "a log range needs bounds > 0, got [0, 1]",
        ),
        (
            {
                "families": {
                    "standard": {"targets": "standard", "space": {"targets.options.lamda1": {"uniform": [0, 1]}}}
                }
            },
            "'standard' has no such setting",
        ),
        (
            {"families": {"standard": {"targets": "standard", "space": {"model.ngf": {"int": [0, 8]}}}}},
            "model.ngf: expected an integer >= 1, got 0",
        ),
        (
            {"families": {"x": {"targets": "inversoin"}}},
            "unknown targets plugin 'inversoin'; did you mean 'inversion'?",
        ),
        (
            {"tune": {"trials": 2, "metric": "fid_digit"}},
            "tune.metric: 'fid_digit' is not among the evaluated metrics; did you mean 'fid_digits'?",
        ),
    ],
)
def test_a_bad_space_is_one_line(tmp_path, change, message):
    raw = {"tune": {"trials": 2}, **BASE, "families": FAMILIES, **change}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli("tune", "-c", str(path), "--out", str(tmp_path / "t"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "t" / "runs").exists()


def test_bad_tune_options_are_one_line(tmp_path):
    path = space_file(tmp_path)
    code, _, err = run_cli("tune", "-c", str(path), "--out", str(tmp_path / "t"), "--trials", "0")
    assert code == 2 and "--trials: expected at least 1 trial per family, got 0" in err
    code, _, err = run_cli(
        "tune", "-c", str(path), "--out", str(tmp_path / "t"), "--storage", "postgresql://localhost/study"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs the database driver" in err, err
    assert "pip install" in err
    code, _, err = run_cli("tune", "-c", str(space_file(tmp_path, trials=1)), "--out", str(tmp_path / "t"))
    assert code == 0, err
    changed = {
        **FAMILIES,
        "standard": {
            **FAMILIES["standard"],
            "space": {**FAMILIES["standard"]["space"], "targets.options.g_lr": {"log_uniform": [1.0e-5, 1.0e-2]}},
        },
    }
    code, _, err = run_cli(
        "tune", "-c", str(space_file(tmp_path, trials=1, families=changed)), "--out", str(tmp_path / "t")
    )
    assert code == 2 and "study 'standard'" in err and "was run with another space" in err, err
    assert "family.space.targets.options.g_lr.log_uniform" in err
