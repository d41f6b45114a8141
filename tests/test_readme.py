"""Every `targetgen` command in the README's code blocks runs as shown, in order, in a fresh folder.

Budgets are reduced (fewer steps, seeds and evaluation samples) by the rules in
``reduced``; commands that need what this machine cannot have are skipped by
``SKIP``, each with its reason. Nothing else is changed: a command that only
works after an earlier one (resume, sample, evaluate, report) runs after it.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SKIP = {
    "--fid-weights": "needs pytorch-fid's Inception weights, which are not shipped",
    "data.path=/data/celeba": "needs CelebA",
    "COMMAND --help": "a placeholder for any command",
}


def readme_commands() -> list[str]:
    """The `targetgen ...` lines of the README's bash blocks, in order, comments and line continuations removed."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("targetgen "):
                commands.append(line)
    return commands


def reduced(command: str) -> list[str]:
    """The command's arguments with a test-sized budget."""
    args = shlex.split(command)[1:]
    if "--steps" in args:  # fewer steps, in the same proportion for a resumed run as for the run itself
        i = args.index("--steps")
        args[i + 1] = "8" if "--resume" in args else "20" if args[0] == "toy" else "4"
    elif args[0] == "train":
        args += ["--steps", "4"]
    if args[0] in ("train", "compare") and "--resume" not in args:
        args += ["--set", "evaluation.n=64"]
    if args[0] == "compare":  # one seed of two steps; TensorBoard's import (seconds) left out of each run's process
        for option, value in (("--seeds", "1"), ("--jobs", "2")):
            if option in args:
                args[args.index(option) + 1] = value
            else:
                args += [option, value]
        args += [
            "--set",
            "train.steps=2",
            "--set",
            "evaluation.every=2",
            "--set",
            "train.loggers=jsonl",
            "--no-progress",
        ]
    if args[0] == "train":
        args += ["--no-progress"]
    if args[0] == "evaluate":
        args += ["--n", "64"]
    return args


def test_the_readme_has_the_commands_this_test_runs():
    commands = readme_commands()
    assert commands[0] == "targetgen train --config configs/digits.yaml" and len(commands) >= 20
    assert any(c.startswith("targetgen train --resume runs/digits") for c in commands)


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in readme_commands():
        if any(marker in command for marker in SKIP):
            continue
        code, out, err = run_cli(*reduced(command))
        assert code == 0, f"{command}\n{err}{out[-2000:]}"
        ran.append(command)
    assert len(ran) >= 18
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "runs" / "cmp" / "report.md").is_file()
