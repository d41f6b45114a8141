"""Samples: generated in chunks, and written as an image grid (a scatter plot for 2-D toy data), a folder
of PNGs, or an ``.npz`` of uint8 N×H×W×C (under ``arr_0``: the layout torch-fidelity, clean-fid and
StudioGAN's evaluators read), the last two streamed so that memory stays at one chunk."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from .data import IMAGE_EXTENSIONS
from .errors import ConfigError, DataError
from .files import atomic_write
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
        Image.fromarray(grid(samples, nrow=max(1, int(len(samples) ** 0.5))).numpy()).save(path)
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


def grid(images: Tensor, nrow: int, padding: int = 2) -> Tensor:
    """Images in [-1, 1] (N×C×H×W, C = 1 or 3) as one uint8 H×W×3 grid of ``nrow`` per row, each framed by
    ``padding`` black pixels: the pixels of torchvision's ``save_image(normalize=True, value_range=(-1, 1))``
    (tested), without importing torchvision, which costs a training process seconds of start-up."""
    n, c, h, w = images.shape
    x = images.clamp(-1, 1).sub(-1).div(2)  # torchvision's order of operations, for the same roundings
    if c == 1:
        x = x.expand(n, 3, h, w)
    if n == 1:  # one image is written as it is, unframed
        out = x[0]
    else:
        cols, rows = min(nrow, n), -(-n // min(nrow, n))
        out = x.new_zeros(3, rows * (h + padding) + padding, cols * (w + padding) + padding)
        for i in range(n):
            top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
            out[:, top : top + h, left : left + w] = x[i]
    return out.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8)


# ----------------------------------------------------------------------------- sample files

FORMATS = ("grid", "png", "npz")


def sample_format(out: Path, requested: str | None) -> str:
    """The format for ``out``: ``requested``, or what its name says (``.png`` a grid, ``.npz``, a folder for PNGs);
    one line naming the value when they do not fit."""
    if requested is not None and requested not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {requested!r}")
    suffix = out.suffix.lower()
    fmt = requested or {".png": "grid", ".npz": "npz", "": "png"}.get(suffix)
    if fmt is None:
        raise ConfigError(f"--out: {out} ends in {suffix!r}; expected .png (a grid), .npz, or a folder for PNGs")
    expected = {"grid": ".png", "npz": ".npz"}.get(fmt)
    if (expected and suffix != expected) or (fmt == "png" and (suffix or out.is_file())):
        shape = "a folder (no extension)" if fmt == "png" else f"a {expected} file"
        raise ConfigError(f"--out: {out} does not fit --format {fmt}, which writes {shape}")
    if fmt != "png" and out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; --format {fmt} writes one file")
    return fmt


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (N×C×H×W) as uint8 N×H×W×C, rounded as torchvision's save_image rounds."""
    return images.detach().float().cpu().add(1).mul(127.5).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def write_png_folder(chunks: Iterable[Tensor], folder: Path) -> None:
    """One PNG per sample, ``000000.png`` onwards."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for chunk in chunks:
        for image in to_uint8(chunk).numpy():
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{index:06d}.png")
            index += 1


def write_npz(chunks: Iterable[Tensor], path: Path, n: int, shape: tuple[int, ...]) -> None:
    """An ``.npz`` holding ``arr_0``, uint8 n×H×W×C, written chunk by chunk into the archive (never whole in
    memory) and renamed into place once complete."""
    channels, height, width = shape
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (n, height, width, channels),
    }

    def write(handle) -> None:
        with (
            zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
            archive.open("arr_0.npy", "w", force_zip64=True) as member,
        ):
            np.lib.format.write_array_header_2_0(member, header)
            written = 0
            for chunk in chunks:
                data = to_uint8(chunk).numpy()
                member.write(np.ascontiguousarray(data).tobytes())
                written += len(data)
            if written != n:
                raise RuntimeError(f"{written} samples written where {n} were announced")

    atomic_write(path, write, "samples")


# ----------------------------------------------------------------------------- reading samples made anywhere


def read_samples(
    path: Path, channels: int, size: int, chunk: int = 256
) -> tuple[int, tuple[int, ...], Iterator[Tensor]]:
    """Images from a folder of image files or an ``.npz`` (uint8 N×H×W×C, or float N×C×H×W in [-1, 1]), as
    (count, C×H×W, chunks in [-1, 1]); read a chunk at a time. ``channels`` and ``size`` are the real side's:
    another shape is one line naming both."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"--samples: no images in {path}")
        with Image.open(files[0]) as first:
            found = (len(first.getbands()), first.height, first.width)
        _check_shape(found, channels, size, path)

        def from_files() -> Iterator[Tensor]:
            for start in range(0, len(files), chunk):
                arrays = []
                for file in files[start : start + chunk]:
                    with Image.open(file) as image:
                        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
                    if array.shape[:2] != (size, size):
                        raise DataError(
                            f"--samples: {file} is {array.shape[1]}×{array.shape[0]}, the others {size}×{size}"
                        )
                    arrays.append(array.reshape(size, size, channels))
                yield _from_uint8(np.stack(arrays))

        return len(files), (channels, size, size), from_files()
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise DataError(f"--samples: expected a folder of images or an .npz file, got {path}")
    try:
        archive = np.load(path, allow_pickle=False, mmap_mode="r")
        array = archive["arr_0"] if "arr_0" in archive.files else archive[archive.files[0]]
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise DataError(f"--samples: {path} cannot be read as .npz ({err})") from None
    if array.ndim != 4:
        raise DataError(f"--samples: {path} holds an array of shape {array.shape}; expected N×H×W×C images")
    nchw = array.dtype != np.uint8 and array.shape[1] in (1, 3)
    found = tuple(array.shape[1:]) if nchw else (array.shape[3], array.shape[1], array.shape[2])
    _check_shape(found, channels, size, path)

    def from_array() -> Iterator[Tensor]:
        for start in range(0, len(array), chunk):
            part = np.asarray(array[start : start + chunk])
            yield torch.from_numpy(part.astype(np.float32)) if nchw else _from_uint8(part)

    return len(array), found, from_array()


def _check_shape(found: tuple[int, ...], channels: int, size: int, path: Path) -> None:
    if found != (channels, size, size):
        raise DataError(
            f"--samples: {path} holds images of {found[0]}×{found[1]}×{found[2]} (C×H×W); the real "
            f"data are {channels}×{size}×{size}: expected the same shape"
        )


def _from_uint8(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
