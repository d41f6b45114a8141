"""Every `targetgen` command in the code blocks of the README and of docs/*.md runs as shown, in order, in one
fresh folder: the README first, then the docs in DOCS order (they use the README's runs).

Budgets are reduced (fewer steps, seeds and evaluation samples) by the rules in ``reduced``; commands that
need what this machine cannot have are skipped by ``SKIP``, each with its reason; blocks that reproduce a
study are fenced as ```` ```bash study ```` and not run (they take minutes to hours). A command repeated in a
later document runs once. Nothing else is changed: a command that only works after an earlier one (resume,
sample, evaluate, report) runs after it.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    "docs/sources.md",
    "docs/evaluation.md",
    "docs/compare.md",
    "docs/theory.md",
    "docs/performance.md",
]
SKIP = {
    "--fid-weights": "needs pytorch-fid's Inception weights, which are not shipped",
    "data.path=/data/celeba": "needs CelebA",
    "COMMAND --help": "a placeholder for any command",
}


def documented_commands(document: str) -> list[str]:
    """The `targetgen ...` lines of a document's bash blocks (not its study blocks), in order, comments and
    line continuations removed."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / document).read_text(), re.S)
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
    planned = "--run-index" in args or "--collect" in args  # these read the plan, whose budget is set
    if args[0] in ("train", "compare") and "--resume" not in args and not planned:
        args += ["--set", "evaluation.n=64"]
    if args[0] == "compare" and not planned:  # one seed of two steps; no TensorBoard import in each run
        for option, value in (("--seeds", "1"), ("--jobs", "2")):
            if option in args:
                args[args.index(option) + 1] = value
            else:
                args += [option, value]
        args += ["--set", "train.steps=2", "--set", "evaluation.every=2", "--set", "train.loggers=jsonl"]
    if args[0] in ("train", "compare", "sample", "evaluate", "tune"):
        args += ["--no-progress"]
    if args[0] in ("sample", "evaluate") and "--n" in args:
        i = args.index("--n")
        args[i + 1] = str(min(int(args[i + 1]), 256))
    elif args[0] == "evaluate":
        args += ["--n", "64"]
    return args


def test_the_readme_has_the_commands_this_test_runs():
    commands = documented_commands("README.md")
    assert commands[0] == "targetgen train --config configs/digits.yaml" and len(commands) >= 15
    assert any(c.startswith("targetgen train --resume runs/digits") for c in commands)
    assert all(documented_commands(d) for d in DOCS)


def test_study_blocks_are_not_run():
    assert not any("tune_mnist5k" in c for c in documented_commands("docs/compare.md"))
    assert "tune_mnist5k" in (ROOT / "docs/compare.md").read_text()


@pytest.mark.slow
def test_every_documented_command_runs_in_order(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    ran: list[str] = []
    for document in DOCS:
        for command in documented_commands(document):
            if command in ran or any(marker in command for marker in SKIP):
                continue
            code, out, err = run_cli(*reduced(command))
            assert code == 0, f"{document}: {command}\n{err}{out[-2000:]}"
            ran.append(command)
    assert len(ran) >= 30
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "runs" / "cmp" / "report.md").is_file()
    assert (tmp_path / "digits.npz").is_file() and (tmp_path / "runs" / "toy2d_cluster" / "report.md").is_file()
