"""Where a run's numbers go: metrics.jsonl always, TensorBoard when installed, any logger plugin.

A logger is a class of the ``targetgen.loggers`` entry-point group, built as
``cls(run_dir, config, start_step)`` (``config`` the resolved config as plain
data; ``start_step`` the step a resumed run continues from, after which
earlier records are void) with two methods::

    log(step: int, values: dict[str, float | None]) -> None   # one record
    close() -> None

W&B or MLflow need no code here: a package registering, say,
``wandb = "mypkg:WandbLogger"`` is used with ``train.loggers: jsonl,wandb``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from .. import jsonsafe, registry
from ..errors import ConfigError
from .rundir import METRICS, truncate_metrics


class Logger(Protocol):
    def log(self, step: int, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """metrics.jsonl: one JSON record per line, appended and flushed (what compare and report read)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        truncate_metrics(run_dir / METRICS, start_step)  # a resumed run redoes what came after its checkpoint
        self.file = (run_dir / METRICS).open("a")

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(jsonsafe.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """TensorBoard event files in ``RUN_DIR/tensorboard`` (``pip install 'targetgen[tensorboard]'``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events after its checkpoint are hidden, as they are redone
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def logger_names(setting: str) -> list[str]:
    """``train.loggers`` as names: jsonl always first; ``auto`` adds tensorboard when it is installed."""
    names = [n.strip() for n in setting.split(",") if n.strip()]
    if "auto" in names:
        names.remove("auto")
        names += ["tensorboard"] if tensorboard_installed() else []
    if "tensorboard" in names and not tensorboard_installed():
        raise ConfigError(
            "train.loggers: 'tensorboard' needs the tensorboard package: pip install 'targetgen[tensorboard]'"
        )
    return ["jsonl", *dict.fromkeys(n for n in names if n != "jsonl")]


def check_loggers(setting: str) -> None:
    """Fail before training on an unknown logger name."""
    for name in logger_names(setting):
        registry.load("loggers", name, "train.loggers")


def open_loggers(setting: str, run_dir: Path, config: dict[str, Any], start_step: int) -> list[Logger]:
    return [
        registry.load("loggers", name, "train.loggers")(run_dir, config, start_step) for name in logger_names(setting)
    ]
