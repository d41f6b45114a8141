"""Composite functional gradient learning (xICFG; Johnson & Zhang, "Composite Functional Gradient Learning of
Generative Adversarial Models", ICML 2018; the authors' code github.com/riejohnson/cfg-gan-pt, cfggan.py).

The model is a composite: samples are G(z) moved by T stored discriminators, x_{t+1} = x_t + η ∇x D_t(x_t)
(D's raw logit, ascended). One discriminator trains all along. A *stage* has T sub-steps: at sub-step t it
takes U steps of the logistic loss, softplus(−D(real)) + softplus(D(fake)), against fresh samples already
moved by D_0 … D_{t−1} of this stage (so its gradient is trained where it is followed), and is then stored as
D_t. After the T sub-steps the generator is regressed onto a pool of ``pool`` pairs (z, x_T), x_T the full
composite's output: the regression engine's pool mode (``regression.pool_epochs`` epochs of minibatches, the
lr cut on a rising epoch). Before the first stage the generator is warm-started on a random linear map of z.

In targetgen's loop every step is one discriminator update on the step's real batch; the stage's last step
also fits the pool (the warm start is step 1's fit). At test time, sample, evaluate and in-run evaluation
score the composite (``sampler``). Differences from the authors' set-up: targetgen's DCGAN networks (not their
dcganx ones), train-mode batch norm in the generator throughout, one thread of control for D and G.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from targetgen import Batch, Targets, TargetSource, TrainingContext, bounded
from targetgen.api import require_finite
from targetgen.distributed import unwrap
from targetgen.errors import ConfigError, DivergenceError
from targetgen.models import forward_preserving_buffers, frozen


@dataclass
class CFGOptions:
    T: int = bounded(10, ge=1)  # discriminators per stage, the composite's steps (the ICML MNIST setting: 10)
    eta: float = bounded(1.0, gt=0)  # η of x ← x + η ∇x D(x) (ICML MNIST: 1; with batch norm and T = 15: 0.5)
    U: int = bounded(1, ge=1)  # discriminator updates per sub-step
    pool: int = bounded(640, ge=1)  # (z, x_T) pairs the generator is fitted to at the end of a stage (10 × 64)
    d_optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    d_lr: float = bounded(0.00025, gt=0)
    d_alpha: float = bounded(0.95, gt=0, lt=1)  # rmsprop's smoothing
    d_eps: float = bounded(1e-18, gt=0)  # rmsprop's ε (the authors': added after the square root, as torch does)
    d_betas: tuple[float, float] = bounded((0.5, 0.999), ge=0, lt=1)  # adam
    warm_start: bool = True  # first regress G onto clamp(z W, −1, 1), W ~ N(0, warm_std²) (the authors' initialisation)
    warm_std: float = bounded(0.01, gt=0)
    # Stop when D(real) − D(fake), the mean logit gap of a stage's last update, exceeds this (the authors' C++
    # default: 40; their PyTorch code: off). None: never.
    diff_max: float | None = bounded(None, gt=0)
    move_batch: int = bounded(64, ge=2)  # samples moved at a time (D's batch norm normalises over them)


class Composite(nn.Module):
    """G followed by the discriminators' steps: what an xICFG model generates."""

    def __init__(self, generator: nn.Module, discriminators: list[nn.Module], eta: float, batch: int = 64):
        super().__init__()
        self.generator = generator
        self.discriminators = nn.ModuleList(discriminators)
        self.eta, self.batch = eta, batch

    def forward(self, z: Tensor) -> Tensor:
        x = self.generator(z)
        return move(x, [frozen(d) for d in self.discriminators], self.eta, self.batch)


def move(x: Tensor, discriminators: list, eta: float, batch: int = 64) -> Tensor:
    """``x`` moved by each of ``discriminators`` (functions of x) in turn: x ← x + η ∇x Σ logit D(x), batch by
    batch, D's batch norm in train mode over each batch (as the authors'). Never records a graph for weights."""
    if not discriminators:
        return x
    out = []
    for part in x.split(batch):
        part = part.detach().float()
        for d in discriminators:
            with torch.enable_grad():
                part = part.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(d(part).sum(), part)
            part = part.detach() + eta * grad
        out.append(part)
    return torch.cat(out)


class CompositeFunctionalGradient(TargetSource):
    """xICFG: targets are the composite's outputs, fitted as a pool once per stage."""

    name = "cfg"
    Options = CFGOptions
    trains_discriminator = True
    counts_its_updates = True  # targets.d_steps stays 1: U is cfg's discriminator updates per sub-step

    def __init__(self, options: CFGOptions, context: TrainingContext):
        super().__init__(options, context)
        if context.world_size > 1:
            raise ConfigError("targets.name: cfg trains in one process (its pools are not split across processes)")
        if not context.latent_shape:
            raise ValueError("cfg draws its own pools: TrainingContext.latent_shape must be set")
        self.netD = context.make_discriminator(sigmoid=False).to(context.device)  # as steps call it
        self.plain_netD = unwrap(self.netD)
        self.optimizerD = (
            torch.optim.RMSprop(self.netD.parameters(), lr=options.d_lr, alpha=options.d_alpha, eps=options.d_eps)
            if options.d_optimizer == "rmsprop"
            else torch.optim.Adam(self.netD.parameters(), lr=options.d_lr, betas=options.d_betas)
        )
        self.snapshots = [copy.deepcopy(self.plain_netD) for _ in range(options.T)]  # D_0 … D_{T−1}
        for snapshot in self.snapshots:
            snapshot.requires_grad_(False)
        self.stored = 0  # snapshots stored so far (a composite uses those only)
        self.gap = 0.0  # mean D(real) − D(fake) of the last update
        offset = 1 if options.warm_start else 0
        self.offset, self.stage_length = offset, options.T * options.U

    # -- where a step stands in its stage -------------------------------------------------------

    def _position(self, step: int) -> tuple[int, int] | None:
        """(sub-step t, update u) of ``step``, or None for the warm start."""
        if step < self.offset:
            return None
        k = (step - self.offset) % self.stage_length
        return k // self.options.U, k % self.options.U

    # -- the step -------------------------------------------------------------------------------

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        """One discriminator update of sub-step t, against fresh samples moved by D_0 … D_{t−1}; the sub-step's
        last update stores D as D_t."""
        position = self._position(step)
        if position is None:
            return {}
        t, u = position
        o, ctx = self.options, self.context
        real = batch.images.to(ctx.device)
        fake = move(self.generated(batch).x.detach(), [frozen(d) for d in self.snapshots[:t]], o.eta, o.move_batch)
        self.netD.zero_grad()
        out_real = require_finite(self.netD(real).view(-1), "D(x)")
        out_fake = require_finite(self.netD(fake).view(-1), "D(G(z))")
        loss = F.softplus(-out_real).mean() + F.softplus(out_fake).mean()
        loss.backward()
        if ctx.penalty is not None and (penalty := ctx.penalty(self.netD, real, fake, step)) is not None:
            penalty.backward()
        self.optimizerD.step()
        self.gap = (out_real.mean() - out_fake.mean()).item()
        if u == o.U - 1:
            self.snapshots[t].load_state_dict(self.plain_netD.state_dict())
            self.stored = max(self.stored, t + 1)
            if t == o.T - 1 and o.diff_max is not None and self.gap > o.diff_max:
                raise DivergenceError(
                    f"D(real) − D(fake) = {self.gap:.3g} exceeded targets.options.diff_max "
                    f"({o.diff_max:g}): the discriminator is exploding"
                )
        return {
            "d_loss": loss.detach(),
            "d_real": out_real.mean().detach(),
            "d_fake": out_fake.mean().detach(),
            "d_gap": self.gap,
            "substep": float(t),
        }

    def propose(self, batch: Batch, step: int) -> Targets:
        """At a stage's end: a pool of (z, x_T) pairs, x_T the composite's output; at the warm start, the pool of
        a random linear map of z; otherwise nothing to fit."""
        o, ctx = self.options, self.context
        position = self._position(step)
        empty = batch.images.new_zeros((0, *ctx.image_shape))
        if position is not None and (position[0] < o.T - 1 or position[1] < o.U - 1):
            return Targets(z=empty.new_zeros((0, *ctx.latent_shape)), x=empty, pool=True)
        z = ctx.sample_latents(o.pool)
        if position is None:  # the warm start: clamp(z W, −1, 1) for a random W, as the authors initialise G
            size = int(torch.tensor(ctx.image_shape).prod())
            w = torch.randn(z[0].numel(), size, device=z.device) * o.warm_std
            x = (z.flatten(1) @ w).clamp(-1, 1).view(len(z), *ctx.image_shape)
            return Targets(z=z, x=x, pool=True, stats={"warm_start": 1.0})
        with torch.no_grad():  # generating changes nothing of the generator, its batch norm statistics included
            x0 = torch.cat([forward_preserving_buffers(ctx.generator, part) for part in z.split(o.move_batch)])
        x = move(x0, [frozen(d) for d in self.snapshots], o.eta, o.move_batch)
        moved = (x - x0).flatten(1).norm(dim=1).mean()
        return Targets(z=z, x=x, pool=True, stats={"target_distance": moved})

    def must_log(self, step: int) -> bool:
        """The warm start and every stage's end, where a pool is proposed and fitted."""
        return step < self.offset or self.probe_step(step) == step

    def probe_step(self, step: int) -> int:
        """The last step of the stage ``step`` is in, where the pool is proposed."""
        if step < self.offset:
            return self.offset + self.stage_length - 1
        return step + (self.stage_length - 1 - (step - self.offset) % self.stage_length)

    def sampler(self, generator: nn.Module) -> nn.Module:
        return Composite(generator, self.snapshots[: self.stored], self.options.eta, self.options.move_batch)

    @classmethod
    def restored_sampler(cls, options, state, generator, make_discriminator) -> nn.Module:
        snapshots = []
        for snapshot_state in state["snapshots"][: state["stored"]]:
            snapshot = make_discriminator(sigmoid=False)
            snapshot.load_state_dict(snapshot_state)
            snapshots.append(snapshot)
        return Composite(generator, snapshots, options.eta, options.move_batch)

    def discriminator(self) -> nn.Module:
        return self.plain_netD

    def diagnostics(self, targets: Targets) -> dict[str, float]:
        return {"stored_discriminators": float(self.stored)}

    def state_dict(self) -> dict:
        return {
            "netD": self.plain_netD.state_dict(),
            "optimizerD": self.optimizerD.state_dict(),
            "snapshots": [s.state_dict() for s in self.snapshots],
            "stored": self.stored,
            "gap": self.gap,
        }

    def load_state_dict(self, state: dict) -> None:
        self.plain_netD.load_state_dict(state["netD"])
        self.optimizerD.load_state_dict(state["optimizerD"])
        for snapshot, saved in zip(self.snapshots, state["snapshots"], strict=True):
            snapshot.load_state_dict(saved)
        self.stored, self.gap = state["stored"], state["gap"]
