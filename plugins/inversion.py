"""Discriminator inversion (Algorithm 1 of Weber, "Exploiting the Hidden Tasks of GANs").

Each step: train the discriminator on real vs generated data (the update
phase, ``targets.d_steps`` times), then turn its label "real" into data-space
targets by N1 gradient steps on the samples (the propose phase):

    x' ← x' − (λ1 / N1) ∇x' [ δ1(D(x'), real) + Σ wᵣ Rᵣ(x', x) ]

δ1 is mean-reduced, like the GAN loss, so that regressing the generator onto
x' with summed ½‖G(z) − x'‖² and step λ2 = η / λ1 is exactly the standard GAN
generator step of size η.

That step's length follows the scale of D's gradient, which has nothing to do
with distances in data space (with Adam the generator then moves hundreds of
times further than the targets ask). ``step_rule`` chooses how far a step goes:

* ``gradient`` — the step above (the paper's; the default);
* ``normalized`` — λ1/N1 along each sample's unit gradient (L2 over all of its
  elements), so that λ1 *is* the distance in data space a target lies from
  its sample after N1 steps in one direction; a sample whose gradient is zero
  stays where it is;
* ``mixed`` — the gradient step, shortened to at most λ1/N1 per sample: small
  gradients keep their size, so a sample D already finds real moves little,
  but no sample moves further than the data-space bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from targetgen import Batch, Targets, TargetSource, TrainingContext, bounded, registry
from targetgen.api import require_finite
from targetgen.distributed import in_bf16, unwrap
from targetgen.errors import ConfigError
from targetgen.models import forward_preserving_buffers, frozen
from targetgen.schedules import scheduled


@dataclass
class InversionOptions:
    lambda1: float = bounded(1.0, gt=0)  # λ1, the inversion step size (split over N1 steps)
    steps: int = bounded(1, ge=1)  # N1
    step_rule: Literal["gradient", "normalized", "mixed"] = "gradient"  # how far each of the N1 steps goes (above)
    discrepancy: Literal["bce", "l2", "hinge", "wasserstein"] = "bce"  # δ1 towards "real"
    regularizers: dict[str, float] = bounded(factory=dict, ge=0)  # e.g. {tv: 0.01}
    clamp: bool = False  # project x' onto [-1, 1] after every inversion step
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # λ1 over the run
    final_fraction: float = bounded(0.0, ge=0, le=1)  # linear / cosine: λ1 at the end, as a fraction of lambda1
    d_loss: Literal["bce", "lsgan", "hinge", "wgan-gp"] = "bce"  # how the discriminator is trained
    d_lr: float = bounded(0.0002, gt=0)
    d_betas: tuple[float, float] = bounded((0.5, 0.999), ge=0, lt=1)
    gp_weight: float = bounded(10.0, ge=0)  # wgan-gp only
    # What the discriminator's fake term sees: the samples G(z) (the GAN step), their inverse examples x' (D is
    # trained where its gradient is followed, as in xICFG), or both (the mean of the two terms)
    d_fakes: Literal["samples", "targets", "both"] = "samples"


def _ones_like(output: Tensor) -> Tensor:
    return torch.ones_like(output)


def discrepancy(output: Tensor, kind: str, probabilities: bool) -> Tensor:
    """δ1(D(x), "real"), mean-reduced. ``probabilities``: D ends in a Sigmoid."""
    if kind == "bce":
        if probabilities:
            return F.binary_cross_entropy(output, _ones_like(output))
        return F.binary_cross_entropy_with_logits(output, _ones_like(output))
    if kind == "l2":
        return (output - 1.0).pow(2).mean()
    if kind == "hinge":
        return F.relu(1.0 - output).mean()
    return -output.mean()  # wasserstein


def inversion_move(grad: Tensor, rule: str, step_size: float, length: float) -> Tensor:
    """What one inversion step subtracts from the samples: ``step_size`` × the gradient (``gradient``),
    ``length`` along each sample's unit gradient (``normalized``), or the gradient step cut to at most
    ``length`` per sample (``mixed``). Lengths are L2 norms over a sample's elements."""
    if rule == "gradient":
        return step_size * grad
    norms = grad.flatten(1).norm(dim=1).view(-1, *(1,) * (grad.dim() - 1))
    tiny = torch.finfo(grad.dtype).tiny  # a zero gradient moves nothing (0 / tiny), never NaN
    if rule == "normalized":
        return grad * (length / norms.clamp_min(tiny))
    return step_size * grad * (length / (step_size * norms).clamp_min(tiny)).clamp(max=1.0)


def _d_terms(kind: str, out_real: Tensor | None, out_fake: Tensor | None) -> Tensor:
    """The discriminator loss split into its real and its fake term (one is None)."""
    out = out_real if out_real is not None else out_fake
    is_real = out_real is not None
    if kind == "bce":  # the tutorial: BCELoss on a Sigmoid output, labels 1 and 0
        label = torch.full_like(out, 1.0 if is_real else 0.0)
        return F.binary_cross_entropy(out, label)
    if kind == "lsgan":
        return 0.5 * (out - (1.0 if is_real else 0.0)).pow(2).mean()
    if kind == "hinge":
        return F.relu(1.0 - out).mean() if is_real else F.relu(1.0 + out).mean()
    return -out.mean() if is_real else out.mean()  # wgan-gp, without its penalty


class DiscriminatorInversion(TargetSource):
    """Targets are the discriminator's label "real" inverted into data space."""

    name = "inversion"
    Options = InversionOptions
    trains_discriminator = True

    def __init__(self, options: InversionOptions, context: TrainingContext):
        super().__init__(options, context)
        if options.d_loss == "wgan-gp" and context.world_size > 1:
            raise ConfigError(
                "targets.options.d_loss: wgan-gp's gradient penalty needs double backward, which "
                "DistributedDataParallel does not support; use bce, lsgan or hinge distributed"
            )
        self.regularizers = [
            (registry.load("regularizers", n, f"targets.options.regularizers.{n}"), w)
            for n, w in options.regularizers.items()
            if w
        ]
        # netD is what the discriminator step calls (inside DDP / autocast when configured);
        # inverse examples differentiate the plain network (not DDP: no gradient of its weights is reduced).
        self.netD = context.make_discriminator(sigmoid=options.d_loss == "bce").to(context.device)
        self.plain_netD = unwrap(self.netD)
        self.optimizerD = torch.optim.Adam(self.netD.parameters(), lr=options.d_lr, betas=options.d_betas)

    # -- the step ---------------------------------------------------------------------------

    def update(self, batch: Batch, step: int) -> dict[str, float]:
        """Phase 1: one discriminator step on the batch against the step's samples (``d_fakes``: or against
        their inverse examples under the discriminator as it is, or both)."""
        samples = self.generated(batch).x.detach()
        if self.options.d_fakes == "samples":
            fakes = [samples]
        else:
            targets = self.inverse_examples(samples, step)[0]
            fakes = [targets] if self.options.d_fakes == "targets" else [samples, targets]
        return self.update_discriminator(batch.images.to(self.context.device), fakes, step)

    def propose(self, batch: Batch, step: int) -> Targets:
        """Phase 2: inverse examples of the step's samples (the discriminator is only read)."""
        generated = self.generated(batch)
        fake = generated.x  # with its graph: the regression reuses it
        x_prime, d_before = self.inverse_examples(fake.detach(), step)
        stats = {"d_fake_before_inversion": d_before, "lambda1": self.lambda1(step)}
        return Targets(z=generated.z, x=x_prime, stats=stats, prediction=fake)

    def update_discriminator(self, real: Tensor, fakes: list[Tensor] | Tensor, step: int = 0) -> dict[str, float]:
        """One discriminator step, the real and fake terms backpropagated in turn as in the tutorial (several
        fake batches: the mean of their terms), then the run's regularizers (``context.penalty``)."""
        kind = self.options.d_loss
        fakes = [fakes] if isinstance(fakes, Tensor) else fakes
        self.netD.zero_grad()
        out_real = require_finite(self.netD(real).view(-1), "D(x)")
        err_real = _d_terms(kind, out_real, None)
        err_real.backward()
        err_fake, d_fake = 0.0, 0.0
        for fake in fakes:
            out_fake = require_finite(self.netD(fake).view(-1), "D(G(z))")
            term = _d_terms(kind, None, out_fake) / len(fakes)
            term.backward()
            err_fake, d_fake = err_fake + term.detach(), d_fake + out_fake.mean().detach() / len(fakes)
        errD = err_real + err_fake
        if kind == "wgan-gp":
            penalty = self.options.gp_weight * self.gradient_penalty(real, fakes[0])
            penalty.backward()
            errD = errD + penalty
        if (
            self.context.penalty is not None
            and (penalty := self.context.penalty(self.netD, real, fakes[0], step)) is not None
        ):
            penalty.backward()
        self.optimizerD.step()
        return {"d_loss": errD.detach(), "d_real": out_real.mean().detach(), "d_fake": d_fake}

    def gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        shape = (real.size(0),) + (1,) * (real.dim() - 1)
        alpha = torch.rand(shape, device=real.device, dtype=real.dtype)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.netD(mixed).sum(), mixed, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    def lambda1(self, step: int) -> float:
        o = self.options
        return scheduled(o.lambda1, o.schedule, step, self.context.total_steps, o.final_fraction)

    def inverse_examples(self, x0: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """N1 steps of length λ1/N1 (by ``step_rule``) from the samples ``x0`` towards "real".

        Returns x' (detached) and the mean discriminator output on ``x0``.
        Only ``x`` is differentiated: the discriminator is frozen (its weights
        detached, gathered once for all N1 passes) and its BatchNorm
        statistics stay as the update left them. In a bf16 run D's matrix
        products are bf16, as in its update; x, x' and the move stay float32.
        """
        o = self.options
        length = self.lambda1(step) / o.steps
        # δ1 is a mean over the batch; distributed, each process holds 1/world_size of the
        # global batch, so its mean is rescaled to the global one's per-sample weight.
        step_size = length / self.context.world_size
        netD = frozen(self.plain_netD)
        if self.context.precision == "bf16":
            netD = in_bf16(netD, self.context.device.type)
        probabilities = self.plain_netD.outputs_probabilities
        x = x0  # float32 (or float64) even under bf16: Autocast hands back float32
        d_before = torch.zeros(())
        for i in range(o.steps):
            x = x.detach().requires_grad_(True)
            output = require_finite(netD(x).view(-1), "D(x') during inversion")
            if i == 0:
                d_before = output.mean().detach()
            delta1 = discrepancy(output, o.discrepancy, probabilities)
            for regularizer, weight in self.regularizers:
                delta1 = delta1 + weight * regularizer(x, x0)
            (grad,) = torch.autograd.grad(delta1, x)
            x = x.detach() - inversion_move(grad, o.step_rule, step_size, length)
            if o.clamp:
                x = x.clamp(-1.0, 1.0)
        return x.detach(), d_before

    # -- log-step diagnostics and checkpoints -----------------------------------------------

    @torch.no_grad()
    def diagnostics(self, targets: Targets) -> dict[str, float]:
        """Costly statistics, computed only on logging steps."""
        x_prime = targets.x
        moved = (x_prime - targets.prediction.detach()).flatten(1).norm(dim=1).mean().item()
        d_after = forward_preserving_buffers(self.plain_netD, x_prime).mean().item()
        return {"d_fake_after_inversion": d_after, "target_distance": moved}

    def discriminator(self):
        return self.plain_netD

    def state_dict(self) -> dict:
        return {"netD": self.plain_netD.state_dict(), "optimizerD": self.optimizerD.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.plain_netD.load_state_dict(state["netD"])
        self.optimizerD.load_state_dict(state["optimizerD"])
