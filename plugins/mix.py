"""A weighted mixture of other target sources (``targets.name: mix``).

    targets:
      name: mix
      options:
        mode: split          # or alternate
        sources:
          - {name: inversion, weight: 0.7, options: {lambda1: 0.25}}
          - {name: imle, weight: 0.3, options: {staleness: 2}}

* ``split`` — every step, the batch (its real images and the step's
  generated samples) is cut into consecutive shares proportional to the
  weights (largest remainder, ties to the first listed; every member with a
  positive weight gets at least one sample when the batch has that many).
  Each member updates and proposes on its share, and the targets are
  concatenated in the order the sources are listed. The step's latents are
  drawn, and its samples generated, once for the whole batch as in an unsplit
  step; each share is a slice of them.
* ``alternate`` — every step one member does the whole step: the one whose
  share of the steps so far lags its weight most (largest deficit, ties to
  the first listed), so that after n steps every member has had its
  n · weight / Σ weights steps to within one. Members with weight 0 never run.

Every member keeps its own options (checked against its own ``Options``),
its own state (checkpointed under its label), its epoch hook (every member's
runs, active or not) and its diagnostics. Its statistics are logged as
``<label>/<name>``; the label is the source's name unless given (``name_i``,
with i its position, when a source is listed twice).

In ``split`` mode an inversion member's δ1 is a mean over its share, so each
of its samples weighs as in a batch of the share's size (the ``normalized``
step rule does not depend on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor

from targetgen import Batch, Generated, Targets, TargetSource, TrainingContext, bounded, registry
from targetgen.config import from_dict, to_dict
from targetgen.errors import ConfigError


@dataclass
class MemberOptions:
    name: str  # a registered target source (not mix, not standard)
    weight: float = bounded(1.0, ge=0)  # its share of the samples (split) or of the steps (alternate)
    options: dict[str, Any] = field(default_factory=dict)  # its own options, checked against its Options
    label: str | None = None  # prefix of its statistics and key of its state; None: its name


@dataclass
class MixOptions:
    mode: Literal["split", "alternate"] = "split"
    sources: list[MemberOptions] = field(default_factory=list)


@dataclass
class Member:
    label: str
    source: TargetSource
    weight: float


def split_sizes(total: int, weights: list[float]) -> list[int]:
    """``total`` samples shared in proportion to ``weights`` (largest remainder, ties to the first);
    every positive weight gets at least one sample when there are that many samples."""
    ideal = [total * w / sum(weights) for w in weights]
    sizes = [math.floor(q) for q in ideal]
    floor = 1 if total >= sum(w > 0 for w in weights) else 0
    sizes = [max(floor, s) if w > 0 else s for s, w in zip(sizes, weights)]
    order = range(len(sizes))
    while sum(sizes) < total:  # the largest remainder gets the next sample
        sizes[max(order, key=lambda i: (ideal[i] - sizes[i], -i))] += 1
    while sum(sizes) > total:  # the minimum of one overshot: the largest surplus gives one back
        sizes[min((i for i in order if sizes[i] > floor), key=lambda i: (ideal[i] - sizes[i], i))] -= 1
    return sizes


class Share(Generated):
    """A slice of a step's latents and samples, which are drawn and generated once for the whole batch
    (on first use, as in an unsplit step): the regression can reuse the whole forward pass."""

    def __init__(self, whole: Generated, part: slice):  # no Generated.__init__: the whole batch's object draws
        self._whole, self._part = whole, part

    @cached_property
    def z(self) -> Tensor:
        return self._whole.z[self._part]

    @cached_property
    def x(self) -> Tensor:
        return self._whole.x[self._part]


def _prefixed(label: str, stats: dict) -> dict:
    return {f"{label}/{key}": value for key, value in stats.items()}


class Mix(TargetSource):
    """Targets from several sources at once (split) or in turn (alternate)."""

    name = "mix"
    Options = MixOptions

    def __init__(self, options: MixOptions, context: TrainingContext):
        super().__init__(options, context)
        specs = options.sources
        if not specs:
            raise ConfigError(
                "targets.options.sources: expected at least one source, e.g. "
                "[{name: inversion, weight: 0.7}, {name: imle, weight: 0.3}]"
            )
        total = sum(spec.weight for spec in specs)
        if total <= 0:
            raise ConfigError(f"targets.options.sources: the weights sum to {total:g}; expected a positive sum")
        names = [spec.name for spec in specs]
        self.members: list[Member] = []
        for i, spec in enumerate(specs):
            where = f"targets.options.sources[{i}]"
            if spec.name == self.name:
                raise ConfigError(f"{where}.name: a mix cannot hold another mix; list its sources here instead")
            if spec.name == registry.STANDARD:
                raise ConfigError(
                    f"{where}.name: {spec.name!r} is the end-to-end GAN step, not a target source "
                    "(inversion gives a discriminator's targets)"
                )
            source_cls = registry.load("targets", spec.name, f"{where}.name")
            member_options = from_dict(source_cls.Options, spec.options, f"{where}.options")
            spec.options = to_dict(member_options)  # the run's resolved config shows every member option
            label = spec.label or (spec.name if names.count(spec.name) == 1 else f"{spec.name}_{i}")
            if any(m.label == label for m in self.members):
                raise ConfigError(f"{where}.label: {label!r} is used twice; give each source its own label")
            self.members.append(Member(label, source_cls(member_options, context), spec.weight))
        self.shares = [m.weight / total for m in self.members]
        self._schedule: list[int] = []  # alternate: the member of every step so far, a function of the weights
        self._counts = [0] * len(self.members)  # ... and how many steps each had
        self._parts: tuple[Generated, list[tuple[Member, Batch]]] | None = None  # split: the step's shares
        self._last: tuple[Targets, list[tuple[Member, Targets]]] | None = None  # the last proposal, for diagnostics

    # -- who does what ----------------------------------------------------------------------------

    def active(self, step: int) -> Member:
        """alternate: the member of ``step``, by largest deficit (a pure function of the weights and ``step``)."""
        while len(self._schedule) <= step:
            n = len(self._schedule)
            deficits = [(n + 1) * share - count for share, count in zip(self.shares, self._counts)]
            chosen = max(range(len(deficits)), key=lambda i: (deficits[i], -i))
            self._schedule.append(chosen)
            self._counts[chosen] += 1
        return self.members[self._schedule[step]]

    def parts(self, batch: Batch) -> list[tuple[Member, Batch]]:
        """split: each member's share of ``batch``, the same for the update and the proposal of a step."""
        generated = self.generated(batch)
        if self._parts is None or self._parts[0] is not generated:
            sizes = split_sizes(len(batch.images), [m.weight for m in self.members])
            parts, start = [], 0
            for member, size in zip(self.members, sizes):
                if size:
                    part = slice(start, start + size)
                    parts.append((member, Batch(batch.images[part], batch.indices[part], Share(generated, part))))
                start += size
            self._parts = (generated, parts)
        return self._parts[1]

    # -- the phases -------------------------------------------------------------------------------

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        if self.options.mode == "alternate":
            member = self.active(step)
            return _prefixed(member.label, member.source.update(batch, step))
        stats = {}
        for member, part in self.parts(batch):
            stats.update(_prefixed(member.label, member.source.update(part, step)))
        return stats

    def propose(self, batch: Batch, step: int) -> Targets:
        if self.options.mode == "alternate":
            member = self.active(step)
            own = member.source.propose(batch, step)
            stats = {**_prefixed(member.label, own.stats), "mix/source": float(self.members.index(member))}
            targets = Targets(z=own.z, x=own.x, weight=own.weight, stats=stats, prediction=own.prediction)
            self._last = (targets, [(member, own)])
            return targets
        proposals = [(member, member.source.propose(part, step)) for member, part in self.parts(batch)]
        targets = self.concatenate(proposals)
        self._last = (targets, proposals)
        return targets

    def concatenate(self, proposals: list[tuple[Member, Targets]]) -> Targets:
        """The members' targets as one batch; a member without a prediction gets one (the regression's
        first step reuses the whole), and one without weights gets weight 1."""
        parts = [t for _, t in proposals]
        prediction = None
        if any(t.prediction is not None for t in parts):
            prediction = torch.cat(
                [t.prediction if t.prediction is not None else self.context.generator(t.z) for t in parts]
            )
        weight = None
        if any(t.weight is not None for t in parts):
            weight = torch.cat(
                [t.weight if t.weight is not None else torch.ones(len(t.z), device=t.z.device) for t in parts]
            )
        stats = {k: v for member, t in proposals for k, v in _prefixed(member.label, t.stats).items()}
        return Targets(
            z=torch.cat([t.z for t in parts]),
            x=torch.cat([t.x for t in parts]),
            weight=weight,
            stats=stats,
            prediction=prediction,
        )

    # -- hooks, diagnostics, checkpoints ----------------------------------------------------------

    def trains_in_update(self) -> bool:  # an instance's answer: it depends on the members
        return any(m.source.trains_in_update() for m in self.members)

    def on_epoch_start(self, epoch: int) -> None:
        for member in self.members:
            member.source.on_epoch_start(epoch)

    def diagnostics(self, targets: Targets) -> dict[str, float]:
        if self._last is None or self._last[0] is not targets:
            return {}
        return {
            k: v
            for member, own in self._last[1]
            for k, v in _prefixed(member.label, member.source.diagnostics(own)).items()
        }

    def state_dict(self) -> dict:
        return {m.label: m.source.state_dict() for m in self.members}

    def load_state_dict(self, state: dict) -> None:
        for member in self.members:
            member.source.load_state_dict(state[member.label])
