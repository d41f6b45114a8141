"""The public contract between targetgen and target sources (first- or third-party).

A target source proposes, for latent inputs ``z``, data-space targets ``x'``;
the shared regression engine then fits the generator to the ``(z, x')`` pairs.
Everything a plugin needs is importable from ``targetgen`` directly.

Contract version 2 (docs/plugins.md): a training step runs named phases —
the source's ``update`` (``targets.d_steps`` times: train what the source owns,
such as a discriminator), then its ``propose`` (no side effects), then the
regression. Version 1 sources, which trained their discriminator inside
``propose``, still run unchanged.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import DivergenceError


class Generated:
    """A step's latents and the generator's samples from them, each made on first use.

    The update and propose phases of one step read the same object, so the
    discriminator is trained on the very samples that are then inverted, as
    in the GAN step. A source that never reads it (IMLE) costs nothing.
    """

    def __init__(self, generator: nn.Module, sample_latents: Callable[[int], Tensor], count: int):
        self._generator, self._sample_latents, self._count = generator, sample_latents, count

    @cached_property
    def z(self) -> Tensor:
        return self._sample_latents(self._count)

    @cached_property
    def x(self) -> Tensor:
        """generator(z), with its autograd graph: the regression engine reuses it for its first step."""
        return self._generator(self.z)


@dataclass
class Batch:
    """A batch of real data, and the step's generated samples."""

    images: Tensor  # real images, N×C×H×W in [-1, 1] (N×2 points for toy2d)
    indices: Tensor  # their positions in the dataset (IMLE needs them)
    generated: Generated | None = None  # set by the training loop; see TargetSource.generated


@dataclass
class Targets:
    """What a target source proposes: fit ``generator(z)`` onto ``x``."""

    z: Tensor  # latent inputs the generator must map ...
    x: Tensor  # ... onto these data-space targets (detached)
    weight: Tensor | None = None  # optional per-sample weights, shape N
    stats: dict[str, float] = field(default_factory=dict)  # diagnostics for the log
    # Optional: generator(z) as the source computed it, with its autograd graph.
    # The regression engine uses it for its first step instead of a second
    # forward pass, which keeps the decomposed step as cheap as the standard one
    # and updates BatchNorm statistics exactly once, as the standard step does.
    prediction: Tensor | None = None
    # A pool of pairs to fit for regression.pool_epochs epochs of minibatches (cfg's), rather than one step's
    # batch to take N2 steps on; an empty Targets (no pairs) fits nothing this step.
    pool: bool = False


@dataclass(frozen=True)
class TrainingContext:
    """What a target source may read about the run. It must never step the generator."""

    generator: nn.Module  # read it, never step it
    sample_latents: Callable[[int], Tensor]
    dataset: Dataset  # the training set, indexable; items are (image, index)
    image_shape: tuple[int, ...]
    device: torch.device
    rank: int = 0  # distributed position (0 of 1 alone); sample_latents already returns this
    world_size: int = 1  # process's share, and ``dataset`` is the whole training set on every rank
    total_steps: int = 1  # length of the run, for schedules
    latent_shape: tuple[int, ...] = ()  # shape of one latent (nz for MLPs, nz×1×1 for DCGAN)
    seed: int = 0  # the run's seed, for draws of a source's own that every process must agree on
    # Builds a fresh discriminator matched to the data and the configured width;
    # ``sigmoid=True`` ends it with the DCGAN tutorial's Sigmoid (for BCE).
    make_discriminator: Callable[..., nn.Module] | None = None
    precision: str = "fp32"  # the run's resolved train.precision: fp32 or bf16
    # The run's discriminator regularizers (the ``discriminator`` section: R1 / R2): call it as
    # ``penalty(netD, real, fake, step)`` inside a discriminator update and backpropagate what it returns (None:
    # nothing due at this step). make_discriminator already applies discriminator.spectral_norm.
    penalty: Callable[..., Tensor | None] | None = None

    def generating(self):
        """A context for a source's own generator passes without gradients (IMLE's pool): bf16 autocast in a
        bf16 run, as the training step's passes. Outputs may come back in bf16: cast them before comparing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def require_finite(values: Tensor, what: str) -> Tensor:
    """``values`` unchanged, or a DivergenceError naming ``what`` when any of them is NaN or infinite.

    For network outputs a step cannot go on with (a BCE loss refuses NaN with
    a traceback); the trainer adds the step and the checkpoint it keeps.
    """
    if not torch.isfinite(values).all():
        raise DivergenceError(f"{what} is not finite")
    return values


class TargetSource(ABC):
    """A source of regression targets. Subclass it and register it under the
    ``targetgen.targets`` entry-point group.

    ``Options`` is a dataclass: the source's own config section
    (``targets.options`` in YAML). Unknown keys are rejected before ``__init__``.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    # Whether the source trains a discriminator (the ``discriminator`` section's regularizers then apply to it)
    trains_discriminator: ClassVar[bool] = False

    def __init__(self, options: Any, context: TrainingContext) -> None:
        self.options = options
        self.context = context

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        """Phase 1, run ``targets.d_steps`` times per step: train what the source owns (a
        discriminator, say) and return statistics for the log. Default: nothing to train."""
        return {}

    @abstractmethod
    def propose(self, batch: Batch, step: int) -> Targets:
        """Phase 2: targets for this step, without side effects on the source's own state.
        ``batch`` holds the real data of the step and, through ``self.generated(batch)``, its samples."""

    def generated(self, batch: Batch) -> Generated:
        """The step's latents and samples: the training loop's, shared by ``update`` and ``propose``;
        drawn from the context when a batch comes without them (tests, ``targetgen probe``)."""
        if batch.generated is None:
            batch.generated = Generated(self.context.generator, self.context.sample_latents, len(batch.images))
        return batch.generated

    @classmethod
    def trains_in_update(cls) -> bool:
        """Whether this source has an update phase of its own (``targets.d_steps`` > 1 needs one)."""
        return cls.update is not TargetSource.update

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first batch of every epoch (0-based)."""

    def diagnostics(self, targets: Targets) -> dict[str, float]:
        """Statistics too costly for every step; called only on logging steps,
        after the regression step, with this step's targets."""
        return {}

    def must_log(self, step: int) -> bool:
        """True for a step whose statistics are logged whatever ``train.log_every`` says: a source that proposes
        only at some steps (cfg: a stage's end) keeps the target distance and reach of every proposal."""
        return False

    def probe_step(self, step: int) -> int:
        """The step ``targetgen probe`` asks for targets at, from a run at ``step``: that step, unless the source
        proposes only at some steps (cfg: at the end of a stage)."""
        return step

    def discriminator(self) -> nn.Module | None:
        """The discriminator this source trains (the plain network), for test-time refinement
        (``targetgen sample --refine``) and the discriminator regularizers; None when it has none."""
        return None

    def sampler(self, generator: nn.Module) -> nn.Module:
        """What samples come from, given the trained generator: the generator itself, unless the source's model
        is more than that (cfg: the generator followed by its discriminator steps). sample, evaluate and in-run
        evaluation score this."""
        return generator

    @classmethod
    def restored_sampler(
        cls, options: Any, state: dict, generator: nn.Module, make_discriminator: Callable[..., nn.Module]
    ) -> nn.Module:
        """``sampler`` of a trained source, rebuilt from its checkpoint ``state`` alone: ``targetgen sample``
        needs no training data. Default: the generator."""
        return generator

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (networks, optimizers, matches)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


def __getattr__(name: str):
    """``TargetGenerator``, the contract's name before 0.2, still works: it is ``TargetSource`` itself, so a
    plugin subclassing it loads unchanged; using the old name warns."""
    if name == "TargetGenerator":
        warnings.warn(
            "targetgen.TargetGenerator is now targetgen.TargetSource; the old name is deprecated and will "
            "be removed in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        return TargetSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
