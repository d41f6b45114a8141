import typing
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from targetgen.config import Activation, ModelConfig, load_config
from targetgen.errors import ConfigError
from targetgen.models import (
    ACTIVATIONS,
    Discriminator,
    Generator,
    MatmulConv2d,
    MatmulConvTranspose2d,
    Maxout,
    MLPGenerator,
    MLPSpec,
    _transposed_by_matmul,
    build_discriminator,
    build_generator,
    sampling_copy,
)

CONFIGS = Path(__file__).parents[1] / "configs"


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
    g = build_generator((channels, size, size), ModelConfig(nz=10, ngf=4))
    d = build_discriminator((channels, size, size), ModelConfig(ndf=4))
    x = g(torch.randn(2, 10, 1, 1))
    assert x.shape == (2, channels, size, size)
    assert d(x).shape == (2, 1, 1, 1)


def test_unsupported_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="support 16, 32, 64, 128 px, got 48"):
        Generator(10, 4, 1, 48)


def test_initialisation_follows_the_tutorial():
    torch.manual_seed(0)
    g = build_generator((3, 64, 64), ModelConfig(nz=100, ngf=64))
    conv = g.main[0].weight
    bn = g.main[1]
    assert abs(conv.std().item() - 0.02) < 0.001 and abs(conv.mean().item()) < 0.001
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert torch.all(bn.bias == 0)


MATMUL_LAYERS = [  # (transposed, in, out, kernel, stride, padding, input side): the DCGAN's and others
    (False, 6, 5, 4, 2, 1, 8),
    (False, 7, 1, 4, 1, 0, 4),
    (False, 3, 4, 3, 1, 1, 5),
    (True, 5, 3, 4, 2, 1, 4),
    (True, 6, 4, 4, 1, 0, 1),
    (True, 2, 3, 3, 2, 0, 3),
]


@pytest.mark.parametrize("transposed, c_in, c_out, k, s, p, side", MATMUL_LAYERS)
def test_matmul_convolutions_are_the_library_layers_with_their_gradients(transposed, c_in, c_out, k, s, p, side):
    torch.manual_seed(0)
    library = (nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, k, s, p, bias=False).double()
    matmul = (MatmulConvTranspose2d if transposed else MatmulConv2d)(c_in, c_out, k, s, p, bias=False).double()
    matmul.load_state_dict(library.state_dict())
    x = torch.randn(3, c_in, side, side + 1, dtype=torch.float64)
    results = []
    for layer in (library, matmul):
        xx = x.clone().requires_grad_()
        out = layer(xx)
        (out * torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        results.append((out, xx.grad, layer.weight.grad))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # second derivatives (R1 differentiates a gradient) through the matmul backward
    xx = x[:1].clone().requires_grad_()
    torch.autograd.gradgradcheck(lambda a, w: functional_call(matmul, {"weight": w}, (a,)), (xx, matmul.weight))
    # forward mode (targetgen probe's kernel products): the same directional derivative as the library layer
    tangents = ({"weight": torch.randn_like(library.weight)}, (torch.randn_like(x),))
    expected, got = (
        torch.func.jvp(partial(functional_call, layer), ({"weight": library.weight.detach()}, (x,)), tangents)
        for layer in (library, matmul)
    )
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_matmul_convolutions_refuse_what_they_do_not_compute():
    with pytest.raises(ValueError, match="MatmulConv2d: square kernels, one stride and padding, no dilation"):
        MatmulConv2d(4, 4, 4, 2, 1, bias=True)
    with pytest.raises(ValueError, match="MatmulConvTranspose2d: square kernels"):
        MatmulConvTranspose2d(4, 4, 4, 2, 1, output_padding=1, bias=False)
    with pytest.raises(ValueError, match="MatmulConv2d: square kernels"):
        MatmulConv2d(4, 4, (3, 4), 2, 1, bias=False)


def test_matmul_convolutions_follow_autocast_as_the_library_layers():
    torch.manual_seed(0)
    library, matmul = nn.Conv2d(8, 16, 4, 2, 1, bias=False), MatmulConv2d(8, 16, 4, 2, 1, bias=False)
    matmul.load_state_dict(library.state_dict())
    x = torch.randn(4, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        expected, got = library(x), matmul(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02)
    got.float().sum().backward()
    assert matmul.weight.grad.dtype == torch.float32  # the weights and their gradients stay float32


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_small_maps_by_matmul_are_the_same_networks(size, spectral_norm):
    torch.manual_seed(0)
    model = ModelConfig(nz=6, ngf=4, ndf=4)
    nets = []
    for matmul in (False, True):
        g = build_generator((3, size, size), model, small_maps_by_matmul=matmul).double()
        d = build_discriminator((3, size, size), model, True, spectral_norm, small_maps_by_matmul=matmul).double()
        nets.append((g, d))
    (g0, d0), (g1, d1) = nets
    g1.load_state_dict(g0.state_dict())
    d1.load_state_dict(d0.state_dict())  # the same parameters under the same names: checkpoints are shared
    g_kinds = [type(m) for m in g1.main if isinstance(m, nn.ConvTranspose2d)]
    d_matmul = [isinstance(m, MatmulConv2d) for m in d1.main if isinstance(m, nn.Conv2d)]  # spectral norm: a subclass
    blocks = len(g_kinds) - 2
    assert g_kinds == [MatmulConvTranspose2d] * 2 + [nn.ConvTranspose2d] * blocks  # on the 1×1 and 4×4 inputs
    assert d_matmul == [False] * blocks + [True] * 2  # 4×4, 1×1 outputs
    z = torch.randn(5, 6, 1, 1, dtype=torch.float64)
    results = []
    for g, d in nets:
        images = g(z)
        d(images).sum().backward()
        results.append([images, *(p.grad for p in [*g.parameters(), *d.parameters()])])
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("image_shape", [(1, 32, 32), (3, 64, 64)])
def test_sampling_copy_is_the_same_generator_and_leaves_it_alone(image_shape):
    torch.manual_seed(0)
    g = build_generator(image_shape, ModelConfig(nz=10, ngf=4)).double()
    g.train()  # matching samples in train mode: BatchNorm uses batch statistics
    buffers = {name: b.clone() for name, b in g.named_buffers()}
    sampler = sampling_copy(g)
    swapped = [type(layer) for layer in sampler.main if not isinstance(layer, (nn.BatchNorm2d, nn.ReLU, nn.Tanh))]
    assert swapped[0] is swapped[-1] is MatmulConvTranspose2d and nn.ConvTranspose2d in swapped[1:-1]
    assert sampler.main[0].weight is not g.main[0].weight  # a copy: matching cannot move the generator
    z = torch.randn(8, 10, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        fast = sampler(z)
        for name, b in g.named_buffers():  # the copy's BatchNorm passes did not reach the generator
            assert torch.equal(b, buffers[name]), name
        torch.testing.assert_close(fast, g(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv",
    [
        nn.ConvTranspose2d(4, 4, (4, 3), 2, 1, bias=False),
        nn.ConvTranspose2d(4, 4, 4, 2, 1, bias=True),
        nn.ConvTranspose2d(4, 4, 4, 2, 1, output_padding=1, bias=False),
    ],
)
def test_only_layers_the_matmul_layer_computes_alike_are_swapped(conv):
    with pytest.raises(ValueError, match="square, bias-free ConvTranspose2d"):
        _transposed_by_matmul(conv)


def test_sampling_copy_of_other_generators_is_a_plain_copy():
    g = MLPGenerator(4, MLPSpec(width=8))
    sampler = sampling_copy(g)
    assert type(sampler) is MLPGenerator and sampler is not g
    assert all(torch.equal(a, b) for a, b in zip(sampler.parameters(), g.parameters(), strict=True))


def test_sampling_copy_keeps_the_library_layers_off_the_cpu():
    # The matmul layers are a CPU measure; a GPU keeps cuDNN's kernels (here: the meta device).
    sampler = sampling_copy(build_generator((1, 32, 32), ModelConfig(nz=10, ngf=4)).to("meta"))
    assert not any(isinstance(layer, MatmulConvTranspose2d) for layer in sampler.main)


# ----------------------------------------------------------------------------- toy2d MLPs


def test_default_mlps_are_the_networks_targetgen_always_had():
    # Same layers in the same order, so the same seed gives the same weights and old checkpoints load.
    torch.manual_seed(3)
    expected_g = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    expected_d = nn.Sequential(
        nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1), nn.Sigmoid()
    )
    torch.manual_seed(3)
    g = build_generator((2,), ModelConfig(nz=8))
    d = build_discriminator((2,), ModelConfig(nz=8))
    for built, expected in ((g.main, expected_g), (d.main, expected_d)):
        assert [type(m) for m in built] == [type(m) for m in expected]
        assert built.state_dict().keys() == expected.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values()))
    assert d.main[1].negative_slope == 0.2 and d.outputs_probabilities
    raw = build_discriminator((2,), ModelConfig(), sigmoid=False)
    assert type(raw.main[-1]) is nn.Linear and not raw.outputs_probabilities


@pytest.mark.parametrize("preset", ["pacgan_grid25", "pacgan_ring8"])
def test_pacgan_networks_have_the_hand_counted_parameters(preset):
    model = load_config(CONFIGS / f"{preset}.yaml").model
    g, d = build_generator((2,), model), build_discriminator((2,), model)
    # G: 2→400 and 3 × 400→400 without bias, 4 batch norms (γ, β), 400→2 with bias
    assert count(g) == 2 * 400 + 3 * 400 * 400 + 4 * 2 * 400 + 400 * 2 + 2 == 484_802
    # D: maxout 2→200×5, 2 × maxout 200→200×5, all with biases, then 200→1
    assert count(d) == (2 * 1000 + 1000) + 2 * (200 * 1000 + 1000) + (200 + 1) == 405_201
    assert [type(m).__name__ for m in g.main] == ["Linear", "BatchNorm1d", "ReLU"] * 4 + ["Linear"]
    assert [type(m).__name__ for m in d.main] == ["Maxout"] * 3 + ["Linear", "Sigmoid"]
    # PacGAN initialises every weight N(0, 0.02) and every bias 0
    weights = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.01)
    assert all(torch.all(m.bias == 0) for m in d.modules() if isinstance(m, nn.Linear))


def test_maxout_is_the_maximum_over_each_units_pieces():
    layer = Maxout(2, width=2, pieces=3)
    with torch.no_grad():  # rows 0–2: unit 0's pieces, rows 3–5: unit 1's
        layer.linear.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, -1], [2, 0], [0, -2], [1, 1]]))
        layer.linear.bias.copy_(torch.tensor([0.0, 0, 0, -1, 0, 0.5]))
    x = torch.tensor([[3.0, -1.0], [-2.0, -4.0]])
    # x = (3, -1): unit 0 max(3, -1, -2) = 3, unit 1 max(5, 2, 2.5) = 5
    # x = (-2, -4): unit 0 max(-2, -4, 6) = 6, unit 1 max(-5, 8, -5.5) = 8
    assert torch.equal(layer(x), torch.tensor([[3.0, 5.0], [6.0, 8.0]]))


def test_every_activation_of_the_config_is_built():
    assert set(ACTIVATIONS) == set(typing.get_args(Activation))


@pytest.mark.parametrize("activation", typing.get_args(Activation))
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("maxout", [None, 3])
@pytest.mark.parametrize("sigmoid", [True, False])
def test_every_discriminator_option_scores_a_batch(activation, batchnorm, maxout, sigmoid):
    model = ModelConfig(d_depth=3, d_width=16, d_activation=activation, d_batchnorm=batchnorm, d_maxout=maxout)
    d = build_discriminator((2,), model, sigmoid)
    x = torch.randn(10, 2)
    scores = d(x)
    assert scores.shape == (10, 1) and d.outputs_probabilities is sigmoid
    if sigmoid:  # probabilities: the raw scores of the layers before, squashed
        torch.testing.assert_close(scores, torch.sigmoid(d.main[:-1](x)))
    else:
        assert type(d.main[-1]) is nn.Linear
    assert sum(isinstance(m, nn.BatchNorm1d) for m in d.modules()) == (3 if batchnorm else 0)
    assert sum(isinstance(m, Maxout) for m in d.modules()) == (3 if maxout else 0)


@pytest.mark.parametrize("activation", typing.get_args(Activation))
def test_generator_depth_width_and_activation(activation):
    g = build_generator((2,), ModelConfig(nz=3, g_depth=3, g_width=7, g_activation=activation))
    linears = [m for m in g.main if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 7), (7, 7), (7, 7), (7, 2)]
    assert sum(type(m) is type(ACTIVATIONS[activation]()) for m in g.main) == 3
    assert g(torch.randn(5, 3)).shape == (5, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.g_activation=swish",
            "model.g_activation: expected one of 'relu', 'leaky_relu', 'tanh', 'elu', got 'swish'",
        ),
        ("model.d_maxout=1", "model.d_maxout: expected an integer >= 2, got 1"),
        ("model.g_depth=0", "model.g_depth: expected an integer >= 1, got 0"),
        ("model.d_width=0", "model.d_width: expected an integer >= 1, got 0"),
        ("model.init_std=0", "model.init_std: expected a number > 0, got 0.0"),
    ],
)
def test_bad_model_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.name=toy2d", override])
    assert str(error.value) == message
