"""The regression engine: fits the generator to a target source's ``(z, x')`` pairs.

It is the same for every target source. It owns the generator's optimizer, the
λ2 schedule, the optional EMA copy of the generator and the optional replay
pool of recent targets; the source decides nothing about how the generator is
fitted.

By default a step takes N2 optimiser steps. ``until_reach`` makes it fit the
targets instead: it keeps stepping until the generator has made the requested
share of the move (target reach), up to ``max_steps``. ``replay`` lets the
steps after the first fit earlier targets too, drawn from the last K batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import registry
from .api import Targets
from .config import RegressionConfig
from .distributed import all_sum, unwrap
from .errors import ConfigError
from .models import forward_preserving_buffers
from .schedules import scheduled


def _check(config: RegressionConfig) -> None:
    if not config.loss:
        raise ConfigError("regression.loss: give at least one loss, e.g. {l2: 1.0}")
    if config.replay is not None and config.steps == 1 and config.until_reach is None:
        raise ConfigError(
            f"regression.replay: {config.replay} does nothing with one regression step per training step "
            "(replay serves the steps after the first); set regression.steps > 1 or regression.until_reach"
        )
    if config.until_reach is not None and config.max_steps < config.steps:
        raise ConfigError(
            f"regression.max_steps: {config.max_steps} is below regression.steps ({config.steps}); "
            "until_reach takes the N2 steps first, so expected at least regression.steps"
        )


class ReplayPool:
    """The last ``size`` batches of targets (z, x', weight), detached, drawn from uniformly.

    Draws use torch's global random number generator, which checkpoints keep,
    and the pool itself is part of the engine's state: resume stays exact.
    """

    def __init__(self, size: int):
        self.size = size
        self.batches: list[dict[str, Tensor | None]] = []

    def add(self, z: Tensor, x: Tensor, weight: Tensor | None) -> None:
        self.batches.append({"z": z.detach(), "x": x.detach(), "weight": None if weight is None else weight.detach()})
        del self.batches[: -self.size]

    def draw(self) -> dict[str, Tensor | None]:
        return self.batches[int(torch.randint(len(self.batches), ()))]


class RegressionEngine:
    def __init__(self, generator: nn.Module, config: RegressionConfig, total_steps: int, world_size: int = 1):
        _check(config)
        self.generator = generator  # as training calls it (inside DDP / autocast when configured)
        self.config = config
        self.total_steps = total_steps
        # DDP averages gradients over processes; a summed loss must add them up instead
        self.sum_scale = float(world_size)
        self.world_size = world_size
        self.losses = [
            (registry.load("losses", name, f"regression.loss.{name}"), weight) for name, weight in config.loss.items()
        ]
        self.optimizer = self.new_optimizer(config.lr / config.steps)
        self.decays = 0  # pool mode: lr cuts so far (reset with a fresh optimizer)
        self.ema = (
            AveragedModel(unwrap(generator), multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
            if config.ema is not None
            else None
        )
        self.replay = ReplayPool(config.replay) if config.replay is not None else None

    def new_optimizer(self, lr: float) -> torch.optim.Optimizer:
        c, params = self.config, self.generator.parameters()
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, betas=c.betas, eps=c.eps)
        if c.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=lr, alpha=c.alpha, eps=c.eps)
        return torch.optim.SGD(params, lr=lr, momentum=c.momentum)

    def fit_pool(self, targets: Targets, step: int) -> dict[str, Tensor | float]:
        """Fit a pool of pairs: ``pool_epochs`` epochs of shuffled minibatches of ``pool_batch`` at the step's lr,
        each pair's δ2 averaged over the minibatch (xICFG's ½‖G(z) − x'‖² per sample); an epoch whose mean loss
        rose cuts the lr × ``decay_on_rise``, at most ``max_decays`` times. Shuffles draw from torch's global
        generator, which checkpoints keep."""
        c = self.config
        lr = scheduled(c.lr, c.schedule, step, self.total_steps, c.final_fraction)
        if c.fresh_optimizer:
            self.optimizer, self.decays = self.new_optimizer(lr), 0
        z, x_target = targets.z, targets.x.detach()
        with torch.no_grad():
            before = torch.cat([forward_preserving_buffers(self.generator, part) for part in z.split(c.pool_batch)])
        last, first = None, None
        for _ in range(c.pool_epochs):
            for group in self.optimizer.param_groups:
                group["lr"] = lr * c.decay_on_rise**self.decays
            losses = []
            for rows in torch.randperm(len(z)).split(c.pool_batch):
                rows = rows.to(z.device)
                prediction = self.generator(z[rows])
                per_sample = sum(w * fn(prediction, x_target[rows]) for fn, w in self.losses)
                loss = per_sample.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.detach())
            mean = torch.stack(losses).mean()
            first = mean if first is None else first
            if last is not None and mean > last and self.decays < c.max_decays:
                self.decays += 1
            last = mean
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.generator))
        reach = target_reach(unwrap(self.generator), z, before, x_target, self.world_size)
        distance = (x_target - before).flatten(1).pow(2).mean(1).sqrt().mean()
        return {
            "regression_loss": first,
            "regression_loss_last_epoch": last,
            "pool_pairs": float(len(z)),
            "target_reach": reach,
            "target_distance_per_pixel": distance,
        }

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
        """N2 optimizer steps of δ2(G(z), x') (with ``until_reach``: as many as it takes, up to
        ``max_steps``); returns diagnostics for the log."""
        c = self.config
        if len(targets.z) == 0:  # nothing to fit this step (cfg between its pools)
            return {}
        if targets.pool:
            return self.fit_pool(targets, step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.step_size(step)
        z, x_target = targets.z, targets.x.detach()
        if self.replay is not None:
            self.replay.add(z, x_target, targets.weight)
        first_loss = before = reach = None
        taken = 0
        for j in range(c.steps if c.until_reach is None else c.max_steps):
            if j == 0:  # the step's own targets, with the source's forward pass when it made one
                inputs, fitted, weight = z, x_target, targets.weight
                prediction = targets.prediction if targets.prediction is not None else self.generator(z)
            else:
                if self.replay is not None:
                    batch = self.replay.draw()
                    inputs, fitted, weight = batch["z"], batch["x"], batch["weight"]
                prediction = self.generator(inputs)
            loss = self.loss(prediction, fitted, weight)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if j == 0:
                first_loss, before = loss.detach(), prediction.detach()
            taken = j + 1
            if c.until_reach is not None and taken >= c.steps:
                reach = target_reach(unwrap(self.generator), z, before, x_target, self.world_size)
                if reach >= c.until_reach:
                    break
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.generator))

        stats = {"regression_loss": first_loss}  # a tensor: the loop reads every statistic at once
        if reach is not None:  # until_reach measured it after every step: the last value is the final reach
            stats.update(target_reach=reach, regression_steps=float(taken))
        elif measure_reach:
            stats["target_reach"] = target_reach(unwrap(self.generator), z, before, x_target, self.world_size)
        if measure_reach:
            # how far the targets lie from the samples in data space, per pixel (RMS), averaged over samples
            stats["target_distance_per_pixel"] = (x_target - before).flatten(1).pow(2).mean(1).sqrt().mean()
        return stats

    def sampling_generator(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.generator)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "decays": self.decays,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "replay": self.replay.batches if self.replay is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.decays = state.get("decays", 0)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.replay is not None:
            device = next(self.generator.parameters()).device  # checkpoints load onto the CPU
            self.replay.batches = [
                {k: None if v is None else v.to(device) for k, v in batch.items()}
                for batch in state.get("replay") or []
            ]


@torch.no_grad()
def target_reach(generator: nn.Module, z: Tensor, before: Tensor, target: Tensor, world_size: int = 1) -> float:
    """r = 1 − ‖G_new(z) − x'‖² / ‖G_old(z) − x'‖²: the share of the requested
    move the generator actually made (1: reached the targets, 0: did not move,
    < 0: moved away). The paper's inductive-bias term K_θ, measured.
    Distributed, over the whole global batch (every process gets the same value)."""
    after = forward_preserving_buffers(generator, z)
    requested, missed = all_sum(
        torch.stack([(before - target).pow(2).sum(), (after - target).pow(2).sum()]), world_size
    )
    if requested == 0:
        return 1.0
    return (1.0 - missed / requested).item()
