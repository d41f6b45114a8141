import pytest
import torch

from targetgen.errors import ConfigError
from torch import nn

from targetgen.models import (
    Discriminator,
    Generator,
    LatentProjection,
    MLPGenerator,
    UpsamplingByMatmul,
    build_discriminator,
    build_generator,
    sampling_copy,
)


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


@pytest.mark.parametrize("c_in, c_out, h, w", [(5, 1, 3, 4), (4, 3, 6, 2), (2, 7, 1, 1)])
def test_upsampling_by_matmul_is_the_transposed_convolution(c_in, c_out, h, w):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False).double()
    x = torch.randn(3, c_in, h, w, dtype=torch.float64)
    expected = conv(x)
    assert expected.shape == (3, c_out, 2 * h, 2 * w)
    torch.testing.assert_close(UpsamplingByMatmul(conv)(x), expected, rtol=0, atol=1e-12)


def test_latent_projection_is_the_first_layer():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 5, 4, 1, 0, bias=False).double()
    z = torch.randn(3, 6, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(LatentProjection(conv)(z), conv(z), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"latents of shape N×nz×1×1, got \(3, 6, 2, 2\)"):
        LatentProjection(conv)(torch.randn(3, 6, 2, 2, dtype=torch.float64))


def test_layers_other_than_theirs_are_refused():
    with pytest.raises(ValueError, match="stride-1, unpadded"):
        LatentProjection(nn.ConvTranspose2d(4, 4, 4, 2, 1, bias=False))
    with pytest.raises(ValueError, match="stride-1, unpadded"):
        LatentProjection(nn.ConvTranspose2d(4, 4, 4, 1, 0, dilation=2, bias=False))
    with pytest.raises(ValueError, match="kernel 4, stride 2, padding 1, no bias"):
        UpsamplingByMatmul(nn.ConvTranspose2d(4, 4, 3, 2, 1, bias=False))
    with pytest.raises(ValueError, match="kernel 4, stride 2, padding 1, no bias"):
        UpsamplingByMatmul(nn.ConvTranspose2d(4, 4, 4, 2, 1, bias=True))


@pytest.mark.parametrize("image_shape", [(1, 32, 32), (3, 64, 64)])
def test_sampling_copy_is_the_same_generator_and_leaves_it_alone(image_shape):
    torch.manual_seed(0)
    g = build_generator(image_shape, nz=10, ngf=4, hidden=0).double()
    g.train()  # matching samples in train mode: BatchNorm uses batch statistics
    buffers = {name: b.clone() for name, b in g.named_buffers()}
    sampler = sampling_copy(g)
    swapped = [type(layer) for layer in sampler.main if not isinstance(layer, (nn.BatchNorm2d, nn.ReLU, nn.Tanh))]
    assert swapped[0] is LatentProjection and swapped[-1] is UpsamplingByMatmul
    z = torch.randn(8, 10, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        fast = sampler(z)
        for name, b in g.named_buffers():  # the copy's BatchNorm passes did not reach the generator
            assert torch.equal(b, buffers[name]), name
        torch.testing.assert_close(fast, g(z), rtol=0, atol=1e-12)


def test_sampling_copy_of_other_generators_is_a_plain_copy():
    g = MLPGenerator(4, 8, 2)
    sampler = sampling_copy(g)
    assert type(sampler) is MLPGenerator and sampler is not g
    assert all(torch.equal(a, b) for a, b in zip(sampler.parameters(), g.parameters(), strict=True))


def test_sampling_copy_keeps_the_library_layers_off_the_cpu():
    # The matmul layers are a CPU measure; a GPU keeps cuDNN's kernels (here: the meta device).
    sampler = sampling_copy(build_generator((1, 32, 32), nz=10, ngf=4, hidden=0).to("meta"))
    assert not any(isinstance(layer, (LatentProjection, UpsamplingByMatmul)) for layer in sampler.main)
