import pytest
import torch

from targetgen.errors import ConfigError
from targetgen.models import Discriminator, Generator, build_discriminator, build_generator


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_tutorial_parameter_counts():
    # The PyTorch DCGAN tutorial's networks at 64×64×3, ngf = ndf = 64.
    assert count(Generator(nz=100, ngf=64, nc=3, image_size=64)) == 3_576_704
    assert count(Discriminator(ndf=64, nc=3, image_size=64)) == 2_765_568


def test_tutorial_layer_structure():
    g = Generator(100, 64, 3, 64).main
    assert [type(m).__name__ for m in g] == (
        ["ConvTranspose2d", "BatchNorm2d", "ReLU"] * 4 + ["ConvTranspose2d", "Tanh"]
    )
    assert [m.out_channels for m in g if hasattr(m, "out_channels")] == [512, 256, 128, 64, 3]
    d = Discriminator(64, 3, 64).main
    assert [m.out_channels for m in d if hasattr(m, "out_channels")] == [64, 128, 256, 512, 1]
    assert type(d[-1]).__name__ == "Sigmoid"
    assert type(Discriminator(64, 3, 64, sigmoid=False).main[-1]).__name__ == "Conv2d"


@pytest.mark.parametrize("size", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_size_and_channel_count(size, channels):
    g = build_generator((channels, size, size), nz=10, ngf=4, hidden=0)
    d = build_discriminator((channels, size, size), ndf=4, hidden=0)
    x = g(torch.randn(2, 10, 1, 1))
    assert x.shape == (2, channels, size, size)
    assert d(x).shape == (2, 1, 1, 1)


def test_unsupported_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="support 16, 32, 64, 128 px, got 48"):
        Generator(10, 4, 1, 48)


def test_initialisation_follows_the_tutorial():
    torch.manual_seed(0)
    g = build_generator((3, 64, 64), nz=100, ngf=64, hidden=0)
    conv = g.main[0].weight
    bn = g.main[1]
    assert abs(conv.std().item() - 0.02) < 0.001 and abs(conv.mean().item()) < 0.001
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert torch.all(bn.bias == 0)
