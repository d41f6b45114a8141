"""Sample pictures: an image grid, or a scatter plot for 2-D toy data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchvision.utils import save_image

from .models import forward_preserving_buffers


@torch.no_grad()
def generate(generator: nn.Module, latents: Tensor, chunk: int = 64, bf16: bool = False) -> Tensor:
    """``generator(latents)`` in chunks, BatchNorm in its current (train) mode as in the DCGAN tutorial,
    without disturbing the running statistics of training; under bf16 autocast with ``bf16`` (a run that
    trains in bf16), the samples handed back in float32."""
    return torch.cat(list(generate_chunks(generator, latents, chunk, bf16)))


@torch.no_grad()
def generate_chunks(generator: nn.Module, latents: Tensor, chunk: int = 64, bf16: bool = False) -> Iterator[Tensor]:
    """``generate``, one chunk at a time: memory stays at one chunk however many latents there are."""
    device = latents.device.type
    for start in range(0, len(latents), chunk):
        part = latents[start : start + chunk]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if len(part) == 1:  # train-mode BatchNorm needs two samples: pad, then drop
                out = forward_preserving_buffers(generator, torch.cat([part, latents[:1]]))[:1]
            else:
                out = forward_preserving_buffers(generator, part)
        yield out.float() if bf16 else out


def save_samples(samples: Tensor, path: Path, data: Tensor | None = None, title: str = "") -> None:
    """Images (N×C×H×W in [-1, 1]) as a grid; 2-D points as a scatter over ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if samples.dim() == 4:
        nrow = max(1, int(len(samples) ** 0.5))
        save_image(samples, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
        return

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.7", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:red", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4)
    fig.savefig(path, dpi=100, bbox_inches="tight")
