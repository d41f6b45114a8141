"""Nearest-neighbour targets: every generated sample is pulled towards real data.

The opposite direction to IMLE (generated → nearest data, as in GLANN-style
training). The data set is indexed once in the chosen space; each step draws
fresh latents, and each sample x = G(z) gets the target

    x' = x + α (nn(x) − x)

where nn(x) is its nearest real image (or the mean of its ``k`` nearest).
α = 1 jumps onto the neighbour; a small α is the gentle nudge that the paper
credits for the sharpness of GAN samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from targetgen import Batch, Targets, TargetSource, TrainingContext, bounded
from targetgen.errors import ConfigError
from targetgen.search import NearestNeighbours
from targetgen.spaces import SearchOptions, embed_dataset, search_space


@dataclass
class NearestOptions(SearchOptions):
    alpha: float = bounded(1.0, gt=0, le=1)  # share of the way to the neighbour (1 = the neighbour itself)
    k: int = bounded(1, ge=1)  # target the mean of the k nearest real images


class NearestTargets(TargetSource):
    name = "nearest"
    Options = NearestOptions

    def __init__(self, options: NearestOptions, context: TrainingContext):
        super().__init__(options, context)
        n = len(context.dataset)
        if not 1 <= options.k <= n:
            raise ConfigError(f"targets.options.k: expected 1 <= k <= {n} (the data set size), got {options.k}")
        self.space = search_space(options, context.image_shape, context.device)
        features = embed_dataset(context.dataset, self.space, context.device)
        self.index = NearestNeighbours(features, options.backend, options.budget_bytes(), max_queries=4096, k=options.k)

    def neighbours(self, indices: torch.Tensor) -> torch.Tensor:
        """Real images at ``indices`` (N×k), averaged over k."""
        dataset = self.context.dataset
        images = torch.stack([torch.stack([dataset[int(i)][0] for i in row]) for row in indices])
        return images.mean(dim=1).to(self.context.device)

    def propose(self, batch: Batch, step: int) -> Targets:
        generated = self.generated(batch)
        z, fake = generated.z, generated.x  # fake keeps its graph: the regression reuses it
        distance, indices = self.index.search(self.space(fake.detach()), self.options.k)
        # lerp(x, nn, 1) is nn exactly (x + 1·(nn − x) need not be, in floating point)
        x_prime = torch.lerp(fake.detach(), self.neighbours(indices), self.options.alpha)
        stats = {"neighbour_distance": distance[:, 0].mean().item()}
        return Targets(z=z, x=x_prime, stats=stats, prediction=fake)
