"""Where a run's numbers go: metrics.jsonl always, TensorBoard when installed, any logger plugin.

A logger is a class of the ``targetgen.loggers`` entry-point group, built as
``cls(run_dir, config, start_step)`` (``config`` the resolved config as plain
data; ``start_step`` the step a resumed run continues from, after which
earlier records are void) with two methods and two optional ones::

    log(step: int, values: dict[str, float | None]) -> None   # one record
    close() -> None
    log_images(step: int, name: str, images: Tensor) -> None   # optional: N×C×H×W in [-1, 1] (the sample grid)
    log_text(name: str, text: str) -> None                      # optional: the resolved config, as YAML

A logger without the optional methods still works; it gets the numbers only.
W&B or MLflow need no code here: a package registering, say,
``wandb = "mypkg:WandbLogger"`` is used with ``train.loggers: jsonl,wandb``
(docs/plugins.md shows one).
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import jsonsafe, registry
from ..errors import ConfigError
from ..samples import grid as image_grid
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


# The group each statistic is shown in on TensorBoard (statistics not named here go to their own prefix's group,
# or to targets/ for a source's own, such as match_distance or lambda1).
GROUPS = {
    "loss": ("d_loss", "g_loss", "regression_loss"),
    "D": ("d_real", "d_fake", "d_fake_after_d_step", "d_fake_before_inversion", "d_fake_after_inversion"),
    "perf": ("images_per_s", "train_s", "images_seen", "epoch"),
}
# The hyperparameters shown beside the final evaluation in TensorBoard's HPARAMS tab.
HPARAMS = (
    "targets.name",
    "targets.d_steps",
    "train.batch_size",
    "train.seed",
    "train.precision",
    "regression.lr",
    "regression.steps",
    "regression.loss",
    "model.ngf",
    "model.ndf",
    "model.nz",
)


def tensorboard_tag(key: str) -> str:
    """``d_loss`` → ``loss/d_loss``, ``images_per_s`` → ``perf/images_per_s``, ``target_reach`` →
    ``targets/target_reach``; ``eval/...`` and other grouped keys (a mix member's ``label/stat``) as they are."""
    if "/" in key:
        return key
    for group, keys in GROUPS.items():
        if key in keys:
            return f"{group}/{key}"
    return f"targets/{key}"


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {prefix: raw}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class TensorBoardLogger:
    """TensorBoard event files in ``RUN_DIR/tensorboard`` (``pip install 'targetgen[tensorboard]'``): statistics
    grouped (loss/, D/, targets/, perf/, eval/), the fixed-noise sample grid, the resolved config as text, and
    the hyperparameters with the last evaluation (HPARAMS)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra

        # purge_step: a resumed run's events after its checkpoint are hidden, as they are redone
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        flat = _flat(config)
        self.hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items() if k in HPARAMS
        }
        self.last_evaluation: dict[str, float] = {}

    def log(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                self.writer.add_scalar(tensorboard_tag(key), value, step)
                if (
                    key.startswith("eval/")
                    and math.isfinite(value)
                    and not re.fullmatch(r"eval/(n|class_\d+_share)", key)
                ):
                    self.last_evaluation[key] = value
        self.writer.flush()

    def log_images(self, step: int, name: str, images: torch.Tensor) -> None:
        grid = image_grid(images.detach().float().cpu(), nrow=max(1, int(len(images) ** 0.5)))
        self.writer.add_image(name, grid.numpy(), step, dataformats="HWC")
        self.writer.flush()

    def log_text(self, name: str, text: str) -> None:
        self.writer.add_text(name, f"```\n{text}\n```")  # shown as Markdown: fenced, it keeps its indentation
        self.writer.flush()

    def close(self) -> None:
        if self.last_evaluation:
            self.writer.add_hparams(
                self.hparams, {f"hparams/{k}": v for k, v in self.last_evaluation.items()}, run_name="."
            )
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
