"""What the pieces of ``training/`` share: a built run, where it stands, what a step reports, and the
``Strategy`` protocol both kinds of step follow. Imports nothing of ``training/``: every other module
of the package points here, none of them back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from ..api import Batch, TargetSource
from ..config import Config
from ..data import TrainingData
from ..distributed import Processes


class Strategy(Protocol):
    """One generator step: the standard GAN's end to end (``standard.StandardGAN``) or the decomposed
    step's three phases (``decomposed.Decomposed``)."""

    def on_epoch_start(self, epoch: int) -> None: ...

    def step(self, batch: Batch, step: int, log: bool) -> dict[str, Tensor | float]:
        """Train one step; statistics stay tensors, the loop reads them once."""

    def sampling_generator(self) -> nn.Module:
        """What sample grids come from (the EMA copy when the run keeps one)."""

    def sampler(self, ema: bool = False) -> nn.Module:
        """What evaluation scores: the trained generator (or its EMA copy), as the source's model uses it."""

    def discriminator(self) -> nn.Module | None:
        """The discriminator the step trains (plain network), or None."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Run:
    """Everything built from a config, in a fixed, seeded order. ``config`` is the resolved config
    (threads, drop_last, image shape, every target option filled in): what config.yaml records."""

    config: Config
    data: TrainingData
    device: Any  # torch.device
    generator: nn.Module  # the plain network (checkpoints, samples, evaluation)
    strategy: Strategy
    fixed_noise: Tensor
    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimizer steps done, once loaded from a checkpoint
    processes: Processes = Processes()
    runtime: str = ""  # device, threads and numeric format in words, printed when training starts

    @property
    def source(self) -> TargetSource | None:
        """The target source of a decomposed run; None for the standard GAN."""
        return getattr(self.strategy, "source", None)


@dataclass
class Position:
    """Where a run stands: what a checkpoint records besides the networks."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` done
    images: int = 0  # real images seen, for equal-budget comparisons
    seconds: float = 0.0  # time spent in training steps (not evaluation or I/O), summed over resumes


@dataclass
class StepEnd:
    """What the loop knows after a step, handed to every callback."""

    run: Run
    pos: Position
    order: Tensor  # this epoch's data order (a checkpoint records it)
    stats: dict[str, float] | None  # this step's statistics, on logging steps only
    images_per_s: float = 0.0
    last: bool = False  # the run's final step
