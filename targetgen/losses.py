"""Regression losses δ2 (group ``targetgen.losses``).

A loss takes ``(prediction, target)`` of shape N×... and returns one value per
sample, on a per-element scale summed over the sample's elements. The
regression engine then sums them over the batch (``reduction: sum``, which
reproduces the GAN generator step) or averages over all elements (``mean``).
"""

from __future__ import annotations

from torch import Tensor


def l2(prediction: Tensor, target: Tensor) -> Tensor:
    """½‖G(z) − x'‖² per sample: the loss that makes the decomposition exact."""
    return 0.5 * (prediction - target).pow(2).flatten(1).sum(1)


def l1(prediction: Tensor, target: Tensor) -> Tensor:
    """‖G(z) − x'‖₁ per sample."""
    return (prediction - target).abs().flatten(1).sum(1)


def ssim(prediction: Tensor, target: Tensor) -> Tensor:
    """(1 − SSIM) per sample, times its number of elements (so that it sums like l1/l2).

    Images in [-1, 1] are mapped to [0, 1] and compared with ``data_range=1``
    (pytorch-msssim). Plain SSIM, not MS-SSIM: the latter needs > 160 px.
    """
    from pytorch_msssim import ssim as _ssim

    if prediction.dim() != 4:
        raise ValueError(f"ssim needs N×C×H×W images, got shape {tuple(prediction.shape)}")
    similarity = _ssim((prediction + 1) / 2, (target + 1) / 2, data_range=1.0, size_average=False)
    return (1.0 - similarity) * prediction[0].numel()
