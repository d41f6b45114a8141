"""The regression engine: fits the generator to a target source's ``(z, x')`` pairs.

It is the same for every target source. It owns the generator's optimizer, the
λ2 schedule and the optional EMA copy of the generator; the source decides
nothing about how the generator is fitted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import registry
from .api import Targets
from .config import RegressionConfig
from .distributed import unwrap
from .errors import ConfigError
from .models import forward_preserving_buffers
from .schedules import scheduled


def _check(config: RegressionConfig) -> None:
    if not config.loss:
        raise ConfigError("regression.loss: give at least one loss, e.g. {l2: 1.0}")


class RegressionEngine:
    def __init__(self, generator: nn.Module, config: RegressionConfig, total_steps: int, world_size: int = 1):
        _check(config)
        self.generator = generator  # as training calls it (inside DDP / autocast when configured)
        self.config = config
        self.total_steps = total_steps
        # DDP averages gradients over processes; a summed loss must add them up instead
        self.sum_scale = float(world_size)
        self.losses = [(registry.load("losses", name, f"regression.loss.{name}"), weight) for name, weight in config.loss.items()]
        params = generator.parameters()
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.lr / config.steps, betas=config.betas)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr / config.steps, momentum=config.momentum)
        self.ema = (
            AveragedModel(unwrap(generator), multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
            if config.ema is not None
            else None
        )

    def loss(self, prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """δ2: the weighted mix of losses, reduced as configured."""
        per_sample = sum(w * fn(prediction, target) for fn, w in self.losses)
        if weight is not None:
            per_sample = per_sample * weight
        if self.config.reduction == "sum":
            return per_sample.sum() * self.sum_scale
        return per_sample.sum() / prediction.numel()

    def step_size(self, step: int) -> float:
        """λ2 / N2 at ``step``."""
        c = self.config
        return scheduled(c.lr, c.schedule, step, self.total_steps, c.final_fraction) / c.steps

    def fit(self, targets: Targets, step: int, measure_reach: bool = False) -> dict[str, Tensor | float]:
        """N2 optimizer steps of δ2(G(z), x'); returns diagnostics for the log."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.step_size(step)
        z, x_target = targets.z, targets.x.detach()
        first_loss = before = None
        for j in range(self.config.steps):
            use_given = j == 0 and targets.prediction is not None
            prediction = targets.prediction if use_given else self.generator(z)
            loss = self.loss(prediction, x_target, targets.weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if j == 0:
                first_loss, before = loss.detach(), prediction.detach()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.generator))

        stats = {"regression_loss": first_loss}  # a tensor: the loop reads every statistic at once
        if measure_reach:
            stats["target_reach"] = target_reach(unwrap(self.generator), z, before, x_target)
        return stats

    def sampling_generator(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.generator)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


@torch.no_grad()
def target_reach(generator: nn.Module, z: Tensor, before: Tensor, target: Tensor) -> float:
    """r = 1 − ‖G_new(z) − x'‖² / ‖G_old(z) − x'‖²: the share of the requested
    move the generator actually made (1: reached the targets, 0: did not move,
    < 0: moved away). The paper's inductive-bias term K_θ, measured."""
    after = forward_preserving_buffers(generator, z)
    requested = (before - target).pow(2).sum()
    if requested == 0:
        return 1.0
    return (1.0 - (after - target).pow(2).sum() / requested).item()
