"""Discriminator-driven sampling: the targets a discriminator proposes, used at test time.

* ``latent`` — Langevin steps in latent space on E(z) = ‖z‖²/2 − d(G(z)), d being D's logit:
  z ← z − η ∇E(z) + √(2ηγ) ξ. With γ = 1 this samples p(z) e^{d(G(z))} (Che et al. 2020, DDLS); DGflow
  (Ansari et al. 2021) takes η = 0.1, γ = 0.01 and 25 steps, the defaults here.
* ``data`` — steps up D's logit on the samples themselves, x ← x + η ∇x d(x) (+ noise of std σ): the
  run's own inverse examples, at test time (xICFG's move).
* ``drs`` — discriminator rejection sampling (Azadi et al. 2019): a candidate x is kept with probability
  σ(F(x)), F = d − d* − log(1 − e^{d − d* − ε}) − γ, d* the largest logit seen (a burn-in first), γ a
  percentile of F (the authors: 95, ε = 1e-6).

Every refinement counts what it costs: generator and discriminator passes per sample kept, and seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import EvaluationConfig
from .errors import ConfigError
from .models import frozen

DRS_EPSILON = 1e-6
DRS_BURN_IN = 2048  # samples whose largest logit starts d*
DRS_MAX_CANDIDATES = 50  # × the samples asked for, before giving up


@dataclass
class Refinement:
    kind: str = "none"
    steps: int = 25
    step_size: float = 0.1
    noise: float = 0.01
    percentile: float = 95.0

    @classmethod
    def of(cls, evaluation: EvaluationConfig) -> Refinement:
        e = evaluation
        return cls(e.refine, e.refine_steps, e.refine_step_size, e.refine_noise, e.refine_percentile)


@dataclass
class Cost:
    """What refinement spent, for samples kept."""

    samples: int = 0
    generator_passes: int = 0  # per-sample forward (+ backward for latent steps) passes through G
    discriminator_passes: int = 0
    seconds: float = 0.0

    def per_sample(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {
            "refine_g_passes_per_sample": self.generator_passes / n,
            "refine_d_passes_per_sample": self.discriminator_passes / n,
            "refine_seconds_per_1000": 1000 * self.seconds / n,
        }


def _logit_and_grad(d, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = d(x).reshape(len(x))
        (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def refined_chunks(
    generator: nn.Module,
    discriminator: nn.Module,
    refinement: Refinement,
    latents: Tensor,
    chunk: int,
    generate_chunk,
    cost: Cost,
    seed: int = 0,
) -> Iterator[Tensor]:
    """Refined samples for ``latents`` (``drs``: as many kept samples, from candidates of its own), a chunk at a
    time. ``generate_chunk(z)`` is how the run generates (train-mode batch norm, bf16 when it trains so);
    ``discriminator`` computes the logit (no final Sigmoid); its weights and buffers are never changed."""
    d = frozen(discriminator)
    g = frozen(generator)
    r = refinement
    if r.kind == "drs":
        yield from _rejection(discriminator, latents, chunk, generate_chunk, cost, seed, r.percentile)
        return
    for start in range(0, len(latents), chunk):
        began = time.perf_counter()
        z = latents[start : start + chunk]
        if r.kind == "latent":
            noise = torch.Generator(device="cpu").manual_seed(seed + start)
            for _ in range(r.steps):
                with torch.enable_grad():
                    z = z.detach().requires_grad_(True)
                    energy = z.flatten(1).pow(2).sum(1) / 2 - d(g(z)).reshape(len(z))
                    (grad,) = torch.autograd.grad(energy.sum(), z)
                z = z.detach() - r.step_size * grad
                if r.noise:
                    z = z + (2 * r.step_size * r.noise) ** 0.5 * torch.randn(z.shape, generator=noise).to(z.device)
            x = generate_chunk(z)
            cost.generator_passes += len(z) * (r.steps + 1)
            cost.discriminator_passes += len(z) * r.steps
        else:  # data
            noise = torch.Generator(device="cpu").manual_seed(seed + start)
            x = generate_chunk(z)
            for _ in range(r.steps):
                _, grad = _logit_and_grad(d, x)
                x = x + r.step_size * grad
                if r.noise:
                    x = x + r.noise * torch.randn(x.shape, generator=noise).to(x.device)
            cost.generator_passes += len(z)
            cost.discriminator_passes += len(z) * r.steps
        cost.samples += len(x)
        cost.seconds += time.perf_counter() - began
        yield x.detach()


def _rejection(
    discriminator, latents: Tensor, chunk: int, generate_chunk, cost: Cost, seed: int, percentile: float
) -> Iterator[Tensor]:
    """DRS: as many accepted samples as ``latents``, from candidates drawn from a generator of their own."""
    began = time.perf_counter()
    shape, device = latents.shape[1:], latents.device
    draws = torch.Generator().manual_seed(seed + 104_729)

    d = frozen(discriminator)  # batch norm's running statistics stay as trained

    def candidates(n: int) -> tuple[Tensor, Tensor]:
        z = torch.randn(n, *shape, generator=draws).to(device)
        x = generate_chunk(z)
        with torch.no_grad():
            logits = d(x).reshape(n).double()
        cost.generator_passes += n
        cost.discriminator_passes += n
        return x, logits

    _, burn = candidates(DRS_BURN_IN)
    top = burn.max()
    wanted, kept, tried = len(latents), 0, 0
    pending: list[Tensor] = []
    while kept < wanted:
        if tried > DRS_MAX_CANDIDATES * wanted:
            raise ConfigError(
                f"--refine drs: accepted {kept} of {tried} candidates, fewer than the {wanted} asked "
                f"for within {DRS_MAX_CANDIDATES}× as many; lower --refine-percentile"
            )
        x, logits = candidates(chunk)
        tried += chunk
        top = torch.maximum(top, logits.max())
        delta = logits - top
        f = delta - torch.log1p(-torch.exp(delta - DRS_EPSILON))
        f = f - torch.quantile(f, percentile / 100)  # γ: over each batch of candidates
        accept = torch.rand(len(f), generator=draws, dtype=torch.float64) < torch.sigmoid(f)
        chosen = x[accept.to(x.device)][: wanted - kept]
        kept += len(chosen)
        pending.append(chosen)
        if sum(len(p) for p in pending) >= chunk or kept == wanted:
            out = torch.cat(pending)
            pending = []
            cost.samples += len(out)
            cost.seconds += time.perf_counter() - began
            began = time.perf_counter()
            yield out
