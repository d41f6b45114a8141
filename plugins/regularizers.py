"""Regularizers added to δ1 during inversion (group ``targetgen.regularizers``).

Each takes ``(x, x0)``, the current inverse examples and the generator's
samples they started from, and returns a scalar averaged over the batch (δ1 is
mean-reduced, so its regularizers are too). The config gives each a weight:
``regularizers: {tv: 0.01, proximity: 0.1}``.
"""

from __future__ import annotations

from torch import Tensor


def total_variation(x: Tensor, x0: Tensor) -> Tensor:
    """Anisotropic total variation per image, averaged over the batch: smooth targets."""
    if x.dim() != 4:
        raise ValueError(f"tv needs N×C×H×W images, got shape {tuple(x.shape)}")
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).sum(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).sum(1)
    return (dh + dw).mean()


def proximity(x: Tensor, x0: Tensor) -> Tensor:
    """‖x' − x₀‖² per sample, averaged: keeps targets near the generator's output."""
    return (x - x0).pow(2).flatten(1).sum(1).mean()


def out_of_range(x: Tensor, x0: Tensor) -> Tensor:
    """Squared excess beyond [-1, 1] per sample, averaged: soft version of clamping."""
    return (x.abs() - 1.0).clamp(min=0).pow(2).flatten(1).sum(1).mean()
