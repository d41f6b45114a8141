"""What every discriminator a run trains shares: its logit, spectral normalization, and the R1 / R2 gradient
penalties (the ``discriminator`` config section), for the standard GAN, inversion and cfg alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import DiscriminatorConfig
from .distributed import unwrap
from .errors import ConfigError


def with_spectral_norm(netD: nn.Module) -> nn.Module:
    """Every convolution and linear layer of ``netD`` under torch's spectral-norm parametrization (one power
    iteration per training forward pass, as Miyato et al.): each layer's largest singular value is kept near 1."""
    for module in list(netD.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            spectral_norm(module)
    return netD


def logit(netD: nn.Module, x: Tensor) -> Tensor:
    """D's raw score, before the tutorial's final Sigmoid when it has one (the plain network, in float32)."""
    plain = unwrap(netD)
    if getattr(plain, "outputs_probabilities", False):
        return plain.main[:-1](x)
    return plain(x)


class Logit(nn.Module):
    """D's logit as a module of its own (the plain network inside, its Sigmoid skipped)."""

    def __init__(self, netD: nn.Module):
        super().__init__()
        self.net = unwrap(netD)

    def forward(self, x: Tensor) -> Tensor:
        return logit(self.net, x)


def squared_gradient_norm(netD: nn.Module, x: Tensor) -> Tensor:
    """‖∇x logit D(x)‖² per sample, with the graph kept (the penalty is trained through)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(logit(netD, x).sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1)


@dataclass
class Penalty:
    """R1 (real samples) and R2 (generated samples): γ/2 · E‖∇x D(x)‖², every ``reg_every`` steps × reg_every."""

    r1: float = 0.0
    r2: float = 0.0
    every: int = 1

    @classmethod
    def of(cls, config: DiscriminatorConfig) -> Penalty:
        return cls(config.r1, config.r2, config.reg_every)

    @property
    def active(self) -> bool:
        return self.r1 > 0 or self.r2 > 0

    def __call__(self, netD: nn.Module, real: Tensor, fake: Tensor, step: int) -> Tensor | None:
        """The penalty to backpropagate at ``step`` (None: none due); call it within D's update."""
        if not self.active or step % self.every:
            return None
        total = torch.zeros((), device=real.device)
        if self.r1:
            total = total + self.r1 / 2 * squared_gradient_norm(netD, real).mean()
        if self.r2:
            total = total + self.r2 / 2 * squared_gradient_norm(netD, fake).mean()
        return total * self.every


def check_discriminator(config: DiscriminatorConfig, d_loss: str | None, world_size: int) -> None:
    """Refuse combinations that cannot work, in one line."""
    penalised = config.r1 > 0 or config.r2 > 0
    if d_loss == "wgan-gp" and (config.spectral_norm or penalised):
        what = "discriminator.spectral_norm" if config.spectral_norm else "discriminator.r1 / r2"
        raise ConfigError(
            f"{what}: with d_loss wgan-gp, whose gradient penalty already constrains D's gradient "
            "(spectral norm bounds every layer by 1, R1 pulls the gradient to 0, the penalty to 1): use one"
        )
    if penalised and world_size > 1:
        raise ConfigError(
            "discriminator.r1 / r2: the penalty needs double backward, which DistributedDataParallel "
            "does not support; train them in one process"
        )
