"""The decomposed step: a target source's update and proposal, then the regression engine's fit.

Next to ``standard.py``, the end-to-end GAN step it is tested against; both follow
``run.Strategy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import Tensor, nn

from ..api import Batch, Generated, TargetSource
from ..distributed import unwrap
from ..errors import ConfigError
from ..regression import RegressionEngine


class Decomposed:
    def __init__(
        self,
        source: TargetSource,
        regression: RegressionEngine,
        sample_latents: Callable[[int], Tensor],
        d_steps: int = 1,
    ):
        if d_steps > 1 and not source.trains_in_update():
            raise ConfigError(
                f"targets.d_steps: {d_steps} needs a source with an update phase; "
                f"'{source.name}' trains nothing of its own there (use 1)"
            )
        if d_steps > 1 and getattr(source, "counts_its_updates", False):
            raise ConfigError(
                f"targets.d_steps: {d_steps}; '{source.name}' counts its discriminator updates itself "
                "(targets.options.U): use 1"
            )
        self.source = source
        self.regression = regression
        self.sample_latents = sample_latents
        self.d_steps = d_steps

    def on_epoch_start(self, epoch: int) -> None:
        self.source.on_epoch_start(epoch)

    def step(self, batch: Batch, step: int, log: bool) -> dict[str, Tensor | float]:
        """One generator step in three phases; statistics stay tensors (the loop reads them once)."""
        stats: dict[str, Tensor | float] = {}
        # 1. update: the source trains what it owns (inversion: its discriminator), on fresh samples each time
        for _ in range(self.d_steps):
            batch = replace(
                batch, generated=Generated(self.regression.generator, self.sample_latents, len(batch.images))
            )
            stats.update(self.source.update(batch, step))
        # 2. propose: targets for the last update's samples (inversion: inverse examples)
        targets = self.source.propose(batch, step)
        stats.update(targets.stats)
        # 3. regress: fit the generator onto the targets
        stats.update(self.regression.fit(targets, step, measure_reach=log))
        if log:
            stats.update(self.source.diagnostics(targets))
        return stats

    def sampling_generator(self) -> nn.Module:
        return self.sampler(ema=True)

    def sampler(self, ema: bool = False) -> nn.Module:
        """What samples come from: the source's model (cfg: a composite) on the generator, or on its EMA copy."""
        return self.source.sampler(self.regression.sampling_generator() if ema else unwrap(self.regression.generator))

    def discriminator(self) -> nn.Module | None:
        return self.source.discriminator()

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "regression": self.regression.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.regression.load_state_dict(state["regression"])
