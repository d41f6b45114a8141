"""The decomposed step: a target source proposes (z, x'), the regression engine fits G."""

from __future__ import annotations

from torch import nn

from ..api import Batch, TargetGenerator
from ..regression import RegressionEngine


class Decomposed:
    def __init__(self, source: TargetGenerator, regression: RegressionEngine):
        self.source = source
        self.regression = regression

    def on_epoch_start(self, epoch: int) -> None:
        self.source.on_epoch_start(epoch)

    def step(self, batch: Batch, step: int, log: bool) -> dict[str, float]:
        # 1. target generation (for inversion: the discriminator step, then inverse examples)
        targets = self.source.propose(batch, step)
        # 2. regression of the generator onto the targets
        stats = dict(targets.stats)
        stats.update(self.regression.fit(targets, step, measure_reach=log))
        if log:
            stats.update(self.source.diagnostics(targets))
        return stats

    def sampling_generator(self) -> nn.Module:
        return self.regression.sampling_generator()

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "regression": self.regression.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.regression.load_state_dict(state["regression"])
