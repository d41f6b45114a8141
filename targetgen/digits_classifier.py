"""Train the digits classifier behind the ``digits`` feature space.

    python -m targetgen.digits_classifier            # writes targetgen/weights/digits_cnn.pt

Deterministic: a fixed split of scikit-learn's 1,797 digits (the last 450 of a
seeded permutation are held out), a fixed seed, one thread, deterministic
algorithms. Training sees random shifts of up to 2 pixels so that the
classifier tolerates the small misalignments of generated digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import _digits
from .features import DIGITS_WEIGHTS, DigitsCNN

HELD_OUT = 450
SEED = 0


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, held-out images, held-out labels), 32×32 in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = _digits(32, 1).float()
    labels = torch.from_numpy(load_digits().target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
    train, test = order[:-HELD_OUT], order[-HELD_OUT:]
    return images[train], labels[train], images[test], labels[test]


def shifted(images: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + images.size(-2), dx : dx + images.size(-1)]


def train_classifier(epochs: int = 40, batch_size: int = 64, lr: float = 1e-3) -> DigitsCNN:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in a fixed order
    try:
        x, y, _, _ = digits_split()
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(SEED)
        for _ in range(epochs):
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
def held_out_accuracy(model: DigitsCNN) -> float:
    _, _, x, y = digits_split()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    args = parser.parse_args()
    model = train_classifier()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"held-out accuracy {held_out_accuracy(model):.4f} ({HELD_OUT} digits); wrote {args.out} "
          f"({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
