"""What the training loop does around its steps, one callback each: the progress bar, logging,
evaluation, sample grids, checkpoints (with retention). The loop calls them in that order after
every step, and once more at the end; each decides for itself when it has work.

Rank 0 alone runs them in a distributed run: they write files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress
from torch import Tensor

from ..errors import ConfigError
from ..evaluation import evaluate
from ..files import atomic_copy, write_json
from ..metric_names import lower_is_better
from ..samples import generate, save_samples
from .checkpoint import save
from .logs import Logger
from .run import Position, Run, StepEnd
from .rundir import CHECKPOINT, CHECKPOINTS, Replacement


class Callback:
    def on_step_end(self, end: StepEnd) -> None:
        """After every step."""

    def on_train_end(self, run: Run, pos: Position) -> None:
        """Once, after the last step (also when a resumed run had nothing left to do)."""


SHOWN = ("d_loss", "g_loss", "regression_loss", "target_reach")  # beside the progress bar


@dataclass
class ShowProgress(Callback):
    """The progress bar: steps done, and the losses of the last logging step."""

    bar: Progress
    task: Any

    def on_step_end(self, end: StepEnd) -> None:
        if end.stats is not None:
            self.bar.update(self.task, losses=" ".join(f"{k}={end.stats[k]:.3g}" for k in SHOWN if k in end.stats))
        self.bar.update(self.task, completed=end.pos.step)


def _record(pos: Position) -> dict[str, Any]:
    return {"epoch": pos.epoch, "images_seen": pos.images, "train_s": pos.seconds}


@dataclass
class LogMetrics(Callback):
    """Every logging step's statistics to every logger."""

    loggers: list[Logger]

    def on_step_end(self, end: StepEnd) -> None:
        if end.stats is not None:
            values = {**_record(end.pos), "images_per_s": end.images_per_s, **end.stats}
            for logger in self.loggers:
                logger.log(end.pos.step, values)


@dataclass
class Evaluate(Callback):
    """The run's evaluation every ``every`` steps and at the end, as ``eval/...`` records.

    Evaluation draws its latents and real subset from seeded generators of its
    own, so it leaves the training trajectory (and exact resume) untouched.
    """

    every: int
    loggers: list[Logger]
    latest: dict[str, float] = field(default_factory=dict)  # for the best-checkpoint callback
    step: int = -1  # the step ``latest`` was evaluated at

    def on_step_end(self, end: StepEnd) -> None:
        if end.pos.step % self.every == 0 or end.last:
            self.latest, self.step = evaluate(end.run), end.pos.step
            values = {**_record(end.pos), **{f"eval/{k}": v for k, v in self.latest.items()}}
            for logger in self.loggers:
                logger.log(end.pos.step, values)


def write_samples(run: Run, path: Path) -> Tensor:
    """The fixed-noise samples as a grid at ``path`` (a scatter plot for 2-D points); returns the samples."""
    samples = generate(run.strategy.sampling_generator(), run.fixed_noise, bf16=run.config.train.precision == "bf16")
    data = run.data.dataset.images if len(run.data.image_shape) == 1 else None
    save_samples(samples, path, data, title=path.stem)
    return samples


@dataclass
class WriteSamples(Callback):
    """A grid from fixed noise every ``every`` steps, and samples/final.png at the end; the image grid also to
    every logger that takes images (``log_images``)."""

    run_dir: Path
    every: int
    loggers: list[Logger] = field(default_factory=list)

    def on_step_end(self, end: StepEnd) -> None:
        if end.pos.step % self.every == 0:
            self._show(write_samples(end.run, self.run_dir / "samples" / f"step_{end.pos.step:06d}.png"), end.pos.step)

    def on_train_end(self, run: Run, pos: Position) -> None:
        self._show(write_samples(run, self.run_dir / "samples" / "final.png"), pos.step)

    def _show(self, samples: Tensor, step: int) -> None:
        if samples.dim() == 4:
            for logger in self.loggers:
                if hasattr(logger, "log_images"):
                    logger.log_images(step, "samples", samples)


@dataclass
class SaveCheckpoints(Callback):
    """``checkpoints/last.pt`` every ``every`` steps and at the end; the last ``keep`` of them
    as ``step_NNNNNN.pt``; and ``best.pt``, the state at the evaluation with the best
    ``best_metric`` so far (``best.json`` says which step and value), when a metric is chosen.

    Retention is a callback (as in Lightning's ModelCheckpoint), not loop code. Kept
    copies are hard links to last.pt (no second write) where the file system has them.
    """

    run_dir: Path
    every: int
    keep: int = 1
    best_metric: str | None = None
    evaluation: Evaluate | None = None
    replacement: Replacement | None = None  # --overwrite: the previous run, deleted after the first checkpoint

    def on_step_end(self, end: StepEnd) -> None:
        last = self.run_dir / CHECKPOINT
        saved = end.pos.step % self.every == 0 or end.last
        if saved:
            save(end.run, last, end.pos, end.order)
            if self.replacement is not None:
                self.replacement.commit()
            if self.keep > 1:
                self._keep(last, end.pos.step)
        evaluated_now = self.evaluation is not None and self.evaluation.step == end.pos.step
        if self.best_metric and evaluated_now and self._is_best():
            best = self.run_dir / CHECKPOINTS / "best.pt"
            if saved:
                atomic_copy(last, best, "checkpoint")
            else:
                save(end.run, best, end.pos, end.order)
            value = self.evaluation.latest[self.best_metric]
            write_json(
                self.run_dir / CHECKPOINTS / "best.json",
                {"step": end.pos.step, self.best_metric: value},
                "best-checkpoint record",
            )

    def _keep(self, last: Path, step: int) -> None:
        folder = last.parent
        atomic_copy(last, folder / f"step_{step:06d}.pt", "checkpoint")
        for old in sorted(folder.glob("step_*.pt"))[: -self.keep]:  # last.pt is the newest of the kept ones
            old.unlink()

    def _is_best(self) -> bool:
        if self.best_metric not in self.evaluation.latest:
            raise ConfigError(
                f"train.best_metric: {self.best_metric!r} is not among the evaluated metrics "
                f"({', '.join(self.evaluation.latest)})"
            )
        value = self.evaluation.latest[self.best_metric]
        if value is None or not math.isfinite(value):
            return False
        record = self.run_dir / CHECKPOINTS / "best.json"
        if not record.is_file():
            return True
        best = json.loads(record.read_text()).get(self.best_metric)
        if best is None:
            return True
        return value < best if lower_is_better(self.best_metric) else value > best
