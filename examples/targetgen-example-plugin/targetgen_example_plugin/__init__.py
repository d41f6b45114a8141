"""An example target source: nudge each generated sample towards a real image.

The target for sample G(z) is x' = G(z) + alpha · (x_real − G(z)), with x_real
the real image at the same position in the batch: no discriminator at all.
"""

from dataclasses import dataclass

import torch

from targetgen import Batch, Targets, TargetSource, TrainingContext


@dataclass
class BlendOptions:
    alpha: float = 0.1  # how far to move towards the real image (1 = all the way)


class BlendTowardsData(TargetSource):
    name = "blend"
    Options = BlendOptions

    def __init__(self, options: BlendOptions, context: TrainingContext):
        super().__init__(options, context)
        if not 0.0 < options.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {options.alpha}")

    def propose(self, batch: Batch, step: int) -> Targets:
        real = batch.images.to(self.context.device)
        generated = self.generated(batch)  # the step's latents and samples (contract version 2)
        fake = generated.x  # handed to the regression engine, which reuses it
        with torch.no_grad():
            target = fake + self.options.alpha * (real - fake)
        stats = {"blend_distance": (real - fake).abs().mean().item()}
        return Targets(z=generated.z, x=target, prediction=fake, stats=stats)
