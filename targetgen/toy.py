"""The paper's toy GAN (appendix A): a linear generator x = B z̃ against a
logistic-regression discriminator f(x) = σ(wᵀx), on data N(μ, Σ) in d dimensions.

It trains through the same parts as every run — the ``inversion`` target source
proposes inverse examples, then the generator is regressed onto them — with one
regression option of its own: the closed-form least-squares fit
B = X'ᵀ Z̃ (Z̃ᵀ Z̃)⁻¹ of the paper's earlier version, next to the regression
engine's gradient steps.

The paper predicts that this GAN matches the data *mean* and never the
*covariance*: the discriminator's input gradient (σ(wᵀx) − 1) w points along one
direction w for every sample, so inverse examples shift the samples instead of
reshaping them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from . import registry
from .api import Batch, TrainingContext
from .config import RegressionConfig
from .data import TensorImages
from .errors import ConfigError
from .regression import RegressionEngine


class LinearGenerator(nn.Module):
    """x = B z̃ with z̃ = (z, 1): ``weight`` and ``bias`` are B's two blocks."""

    def __init__(self, dim: int):
        super().__init__()
        self.affine = nn.Linear(dim, dim)
        with torch.no_grad():  # start as the prior itself: N(0, I)
            self.affine.weight.copy_(torch.eye(dim))
            self.affine.bias.zero_()

    def forward(self, z: Tensor) -> Tensor:
        return self.affine(z)

    def mean(self) -> Tensor:
        return self.affine.bias.detach()

    def covariance(self) -> Tensor:
        w = self.affine.weight.detach()
        return w @ w.T


class LogisticDiscriminator(nn.Module):
    """f(x) = σ(wᵀx), the paper's discriminator (no bias)."""

    outputs_probabilities = True

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Linear(dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.w(x)).squeeze(1)


def closed_form_regression(generator: LinearGenerator, z: Tensor, targets: Tensor) -> None:
    """Set B to the least-squares fit of the targets: B = X'ᵀ Z̃ (Z̃ᵀ Z̃)⁻¹."""
    z_tilde = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    solution = torch.linalg.lstsq(z_tilde, targets.detach()).solution  # (d + 1) × d, = Bᵀ
    with torch.no_grad():
        generator.affine.weight.copy_(solution[:-1].T)
        generator.affine.bias.copy_(solution[-1])


def toy_data(dim: int, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` points of N(μ, Σ): μ and an anisotropic, correlated Σ drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    mu = 2.0 * torch.rand(dim, generator=g, dtype=torch.float64) + 1.0
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    sigma = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    points = mu + torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    return points, mu, sigma


@dataclass
class ToyResult:
    dim: int
    regression: str
    steps: list[int] = field(default_factory=list)
    mean_error: list[float] = field(default_factory=list)  # ‖b − μ‖
    covariance_error: list[float] = field(default_factory=list)  # ‖W Wᵀ − Σ‖_F
    data_mean: list[float] = field(default_factory=list)
    data_covariance: list[list[float]] = field(default_factory=list)


def train_toy(
    dim: int = 2,
    steps: int = 1000,
    regression: Literal["closed-form", "gradient"] = "closed-form",
    lambda1: float = 100.0,  # large because δ1 is mean-reduced: each sample moves λ1 / batch size
    lr: float = 0.01,  # λ2 of the gradient regression (SGD on the summed ½‖G(z) − x'‖²)
    d_lr: float = 0.01,
    batch_size: int = 256,
    seed: int = 0,
    record_every: int = 10,
) -> tuple[ToyResult, LinearGenerator, Tensor]:
    """Train the toy GAN; returns the error history, the generator and the data (float64)."""
    if dim < 1 or steps < 1 or batch_size <= dim:
        raise ConfigError(
            f"toy: expected dim >= 1, steps >= 1 and batch size > dim (the closed form needs "
            f"d + 1 samples); got dim {dim}, steps {steps}, batch size {batch_size}"
        )
    if regression not in ("closed-form", "gradient"):
        raise ConfigError(f"--regression: expected closed-form or gradient, got {regression!r}")
    points, mu, sigma = toy_data(dim, 10_000, seed)
    torch.manual_seed(seed)
    generator = LinearGenerator(dim).double()
    context = TrainingContext(
        generator=generator,
        sample_latents=lambda n: torch.randn(n, dim, dtype=torch.float64),
        dataset=TensorImages(points),
        image_shape=(dim,),
        device=torch.device("cpu"),
        total_steps=steps,
        make_discriminator=lambda sigmoid=True: LogisticDiscriminator(dim).double(),
    )
    inversion = registry.load("targets", "inversion")
    source = inversion(inversion.Options(lambda1=lambda1, d_lr=d_lr), context)
    engine = (
        RegressionEngine(generator, RegressionConfig(lr=lr, optimizer="sgd"), steps)
        if regression == "gradient"
        else None
    )

    result = ToyResult(dim, regression, data_mean=mu.tolist(), data_covariance=sigma.tolist())

    def record(step: int) -> None:
        result.steps.append(step)
        result.mean_error.append((generator.mean() - mu).norm().item())
        result.covariance_error.append((generator.covariance() - sigma).norm().item())

    record(0)
    data_order = torch.Generator().manual_seed(seed)
    for step in range(steps):
        indices = torch.randint(len(points), (batch_size,), generator=data_order)
        batch = Batch(points[indices], indices)
        source.update(batch, step)  # the logistic discriminator's step
        targets = source.propose(batch, step)
        if regression == "closed-form":
            closed_form_regression(generator, targets.z, targets.x)
        else:
            engine.fit(targets, step)
        if (step + 1) % record_every == 0 or step + 1 == steps:
            record(step + 1)
    return result, generator, points


def write_toy_outputs(result: ToyResult, generator: LinearGenerator, points: Tensor, out: Path) -> list[Path]:
    """toy.json (history and final errors), errors.png and, for d = 2, scatter.png."""

    out.mkdir(parents=True, exist_ok=True)
    record = {
        **asdict(result),
        "final": {"mean_error": result.mean_error[-1], "covariance_error": result.covariance_error[-1]},
        "initial": {"mean_error": result.mean_error[0], "covariance_error": result.covariance_error[0]},
        "generator": {"mean": generator.mean().tolist(), "covariance": generator.covariance().tolist()},
    }
    paths = [out / "toy.json", out / "errors.png"]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    ax.plot(result.steps, result.mean_error, label="‖mean error‖ = ‖b − μ‖")
    ax.plot(result.steps, result.covariance_error, label="‖covariance error‖ = ‖BBᵀ − Σ‖_F")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("training step")
    ax.set_ylabel("error")
    ax.set_title(f"linear G vs logistic D, d = {result.dim}, {result.regression} regression")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)

    if result.dim == 2:
        with torch.no_grad():
            samples = generator(torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        ax.scatter(points[:2000, 0], points[:2000, 1], s=3, c="0.6", label="data N(μ, Σ)")
        ax.scatter(samples[:, 0], samples[:, 1], s=3, c="tab:red", alpha=0.6, label="generator")
        ax.set_aspect("equal")
        ax.set_title("same mean, different covariance")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "scatter.png")
        fig.savefig(paths[2], dpi=110)
    return paths
