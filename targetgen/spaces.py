"""The space in which nearest neighbours are searched (IMLE, nearest targets).

* ``pixels`` — the images (or toy2d points) flattened;
* ``downsample`` — images average-pooled to ``downsample_to``² pixels first,
  which keeps CelebA-sized searches cheap while keeping the coarse layout;
* ``projection`` — a fixed random Gaussian projection to ``projection_dim``
  dimensions (Johnson–Lindenstrauss: distances are kept up to a small factor);
* any other name — a feature extractor from the ``targetgen.features``
  entry-point group: a class built as ``cls(device=...)`` and called on
  images in [-1, 1], returning one feature vector per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import registry
from .config import bounded
from .data import iterate_batches
from .errors import ConfigError
from .search import BACKENDS

BUILTIN_SPACES = ("pixels", "downsample", "projection")


@dataclass
class SearchOptions:
    """Where and how a target source searches nearest neighbours (imle, nearest)."""

    space: str = "pixels"  # pixels | downsample | projection | a targetgen.features name
    downsample_to: int = bounded(8, ge=1)  # space=downsample: side of the pooled image
    projection_dim: int = bounded(64, ge=1)  # space=projection: dimensions kept
    memory_budget: float = bounded(2.0, gt=0)  # GiB of working memory for one search
    backend: str = "auto"  # auto | faiss-gpu | faiss-cpu | torch

    def budget_bytes(self) -> int:
        return int(self.memory_budget * 1024**3)


def search_space(options: SearchOptions, image_shape: tuple[int, ...], device: torch.device) -> SearchSpace:
    """The space of ``options``, after checking its budget and backend."""
    if options.backend not in BACKENDS:
        raise ConfigError(f"targets.options.backend: expected one of {', '.join(BACKENDS)}, got {options.backend!r}")
    return SearchSpace(options.space, image_shape, device, options.downsample_to, options.projection_dim)


class SearchSpace:
    """Maps images (N×C×H×W) or points (N×2) to float32 vectors on the CPU."""

    def __init__(
        self,
        name: str,
        image_shape: tuple[int, ...],
        device: torch.device,
        downsample_to: int = 8,
        projection_dim: int = 64,
        seed: int = 0,
        key: str = "targets.options.space",
    ):
        self.name = name
        is_image = len(image_shape) == 3
        self.extractor = None
        self.projection = None
        if name == "downsample":
            if not is_image:
                raise ConfigError(f"{key}: 'downsample' needs images; these data are {image_shape[0]}-d points")
            if not 1 <= downsample_to <= image_shape[-1]:
                raise ConfigError(f"targets.options.downsample_to: expected 1..{image_shape[-1]}, got {downsample_to}")
            self.downsample_to = downsample_to
        elif name == "projection":
            if projection_dim < 1:
                raise ConfigError(f"targets.options.projection_dim: expected >= 1, got {projection_dim}")
            dim = math.prod(image_shape)
            # Fixed by ``seed`` and drawn from its own generator: the projection
            # takes nothing from the training RNG, so resume stays exact.
            generator = torch.Generator().manual_seed(seed)
            self.projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        elif name != "pixels":
            if name not in registry.names("features"):
                valid = ", ".join([*BUILTIN_SPACES, *registry.names("features")])
                raise ConfigError(f"{key}: unknown space {name!r}; expected one of {valid}")
            self.extractor = registry.load("features", name)(device=device)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        if self.extractor is not None:
            x = self.extractor(x)
        elif self.name == "downsample":
            x = F.adaptive_avg_pool2d(x, self.downsample_to)
        x = x.reshape(len(x), -1).to("cpu", torch.float32)
        if self.projection is not None:
            x = x @ self.projection
        return x


def embed_dataset(dataset, space: SearchSpace, device: torch.device, batch_size: int = 512) -> Tensor:
    """Every data point in ``space``, in data-set order."""
    in_order = iterate_batches(dataset, torch.arange(len(dataset)), batch_size, 0, drop_last=False)
    return torch.cat([space(batch.images.to(device)) for batch in in_order])
