"""DCGAN generator and discriminator (PyTorch DCGAN tutorial), and MLPs for toy2d.

At 64×64×3 with ngf = ndf = 64 these are the tutorial's networks layer for
layer (3,576,704 and 2,765,568 parameters). Other sizes add or remove one
stride-2 block per factor of two, keeping the tutorial's channel doubling.

The toy2d MLPs take their depth, width, batch norm, activation and maxout from
the ``model`` section; the defaults are the networks targetgen always had, and
``configs/pacgan_*.yaml`` build PacGAN's (484,802 and 405,201 parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .config import ModelConfig
from .discriminators import with_spectral_norm
from .errors import ConfigError

IMAGE_SIZES = (16, 32, 64, 128)


def _blocks(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ConfigError(
            f"data.image_size: the DCGAN models support {', '.join(map(str, IMAGE_SIZES))} px, got {image_size}"
        )
    return int(math.log2(image_size)) - 2  # stride-2 layers between 4×4 and the image


class Generator(nn.Module):
    """With ``small_maps_by_matmul`` the two layers on 1×1 and 4×4 inputs are ``MatmulConvTranspose2d``:
    the same network and parameters, computed faster under bf16 on AMX."""

    def __init__(
        self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64, small_maps_by_matmul: bool = False
    ):
        super().__init__()
        n = _blocks(image_size)
        small = MatmulConvTranspose2d if small_maps_by_matmul else nn.ConvTranspose2d
        layers: list[nn.Module] = [
            # input is Z, going into a convolution
            small(nz, ngf * 2 ** (n - 1), 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 2 ** (n - 1)),
            nn.ReLU(True),
        ]
        for i in range(n - 1, 0, -1):  # state size doubles, channels halve
            layers += [
                (small if i == n - 1 else nn.ConvTranspose2d)(ngf * 2**i, ngf * 2 ** (i - 1), 4, 2, 1, bias=False),
                nn.BatchNorm2d(ngf * 2 ** (i - 1)),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        return self.main(input)


class Discriminator(nn.Module):
    """With ``small_maps_by_matmul`` the two layers with 4×4 and 1×1 outputs are ``MatmulConv2d`` (as the
    generator's)."""

    def __init__(
        self,
        ndf: int = 64,
        nc: int = 3,
        image_size: int = 64,
        sigmoid: bool = True,
        batchnorm: bool = True,
        small_maps_by_matmul: bool = False,
    ):
        super().__init__()
        n = _blocks(image_size)
        small = MatmulConv2d if small_maps_by_matmul else nn.Conv2d
        layers: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for i in range(1, n):
            layers += [
                (small if i == n - 1 else nn.Conv2d)(ndf * 2 ** (i - 1), ndf * 2**i, 4, 2, 1, bias=False),
                *([nn.BatchNorm2d(ndf * 2**i)] if batchnorm else []),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(small(ndf * 2 ** (n - 1), 1, 4, 1, 0, bias=False))
        # The tutorial ends in Sigmoid for BCELoss; other losses want raw scores.
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.main = nn.Sequential(*layers)
        self.outputs_probabilities = sigmoid

    def forward(self, input: Tensor) -> Tensor:
        return self.main(input)


@dataclass(frozen=True)
class MLPSpec:
    """The shape of a toy2d MLP: ``depth`` hidden layers of ``width`` units, then a linear output layer.

    A hidden layer is Linear → [BatchNorm1d] → activation, or with ``maxout`` pieces a
    maxout unit (the maximum of ``maxout`` linear pieces) → [BatchNorm1d].
    """

    depth: int = 2
    width: int = 128
    activation: str = "relu"
    batchnorm: bool = False
    maxout: int | None = None  # pieces per unit; replaces the activation
    init_std: float | None = None  # weights N(0, init_std), biases 0; None: PyTorch's default


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(True),
    "leaky_relu": lambda: nn.LeakyReLU(0.2, True),
    "tanh": nn.Tanh,
    "elu": lambda: nn.ELU(inplace=True),
}


class Maxout(nn.Module):
    """``width`` maxout units (Goodfellow et al. 2013): each the maximum of ``pieces`` affine maps of the input."""

    def __init__(self, in_dim: int, width: int, pieces: int):
        super().__init__()
        self.width, self.pieces = width, pieces
        self.linear = nn.Linear(in_dim, width * pieces)

    def forward(self, x: Tensor) -> Tensor:
        # consecutive outputs are one unit's pieces, as in Blocks' LinearMaxout (PacGAN's discriminator)
        return self.linear(x).view(len(x), self.width, self.pieces).amax(dim=2)


def mlp_layers(in_dim: int, out_dim: int, spec: MLPSpec) -> list[nn.Module]:
    """The layers of an MLP of shape ``spec`` from ``in_dim`` to ``out_dim`` features."""
    layers: list[nn.Module] = []
    features = in_dim
    for _ in range(spec.depth):
        if spec.maxout is not None:
            layers.append(Maxout(features, spec.width, spec.maxout))
        else:
            # before BatchNorm a bias would be subtracted again with the batch mean: BatchNorm's shift replaces it
            layers.append(nn.Linear(features, spec.width, bias=not spec.batchnorm))
        if spec.batchnorm:
            layers.append(nn.BatchNorm1d(spec.width))
        if spec.maxout is None:
            layers.append(ACTIVATIONS[spec.activation]())
        features = spec.width
    layers.append(nn.Linear(features, out_dim))
    if spec.init_std is not None:
        for linear in (m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(linear.weight, 0.0, spec.init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
    return layers


class MLPGenerator(nn.Module):
    """Generator for 2-D point data (toy2d); by default 2 hidden layers of 128 ReLU units."""

    def __init__(self, nz: int, spec: MLPSpec = MLPSpec(), out_dim: int = 2):
        super().__init__()
        self.main = nn.Sequential(*mlp_layers(nz, out_dim, spec))

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z.flatten(1))


class MLPDiscriminator(nn.Module):
    """Discriminator for 2-D point data; by default 2 hidden layers of 128 LeakyReLU(0.2) units."""

    def __init__(self, spec: MLPSpec = MLPSpec(activation="leaky_relu"), in_dim: int = 2, sigmoid: bool = True):
        super().__init__()
        layers = mlp_layers(in_dim, 1, spec)
        # Sigmoid for BCELoss, as the DCGAN discriminator; other losses want raw scores.
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.main = nn.Sequential(*layers)
        self.outputs_probabilities = sigmoid

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def generator_spec(model: ModelConfig) -> MLPSpec:
    """The toy2d generator's shape from the ``model`` section."""
    return MLPSpec(
        model.g_depth, model.g_width or model.hidden, model.g_activation, model.g_batchnorm, init_std=model.init_std
    )


def discriminator_spec(model: ModelConfig) -> MLPSpec:
    """The toy2d discriminator's shape from the ``model`` section."""
    return MLPSpec(
        model.d_depth,
        model.d_width or model.hidden,
        model.d_activation,
        model.d_batchnorm,
        model.d_maxout,
        model.init_std,
    )


def weights_init(m: nn.Module) -> None:
    """The tutorial's initialisation: conv N(0, 0.02), BatchNorm N(1, 0.02), bias 0."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


def build_generator(image_shape: tuple[int, ...], model: ModelConfig, small_maps_by_matmul: bool = False) -> nn.Module:
    if len(image_shape) == 1:
        return MLPGenerator(model.nz, generator_spec(model), image_shape[0])
    netG = Generator(model.nz, model.ngf, image_shape[0], image_shape[1], small_maps_by_matmul)
    netG.apply(weights_init)
    return netG


def build_discriminator(
    image_shape: tuple[int, ...],
    model: ModelConfig,
    sigmoid: bool = True,
    spectral_norm: bool = False,
    small_maps_by_matmul: bool = False,
) -> nn.Module:
    """The discriminator for ``image_shape``; with ``spectral_norm`` every layer is spectrally normalised (after
    the tutorial's initialisation) and the DCGAN's batch norms are left out (``discriminators.with_spectral_norm``)."""
    if len(image_shape) == 1:
        netD = MLPDiscriminator(discriminator_spec(model), image_shape[0], sigmoid)
    else:
        netD = Discriminator(
            model.ndf, image_shape[0], image_shape[1], sigmoid, not spectral_norm, small_maps_by_matmul
        )
        netD.apply(weights_init)
    if spectral_norm:
        with_spectral_norm(netD)
    return netD


def _dcgan_size(image_shape: tuple[int, ...], model: ModelConfig) -> tuple[int, int]:
    """(parameters of G and D, activation values per sample of one G and D pass) of the DCGAN pair."""
    channels, size = image_shape[0], image_shape[1]
    n = _blocks(size)
    g_widths = [model.ngf * 2**i for i in range(n - 1, -1, -1)]  # 4×4 … size/2, then the image
    params = (
        model.nz * g_widths[0] * 16
        + sum(a * b * 16 for a, b in zip(g_widths, g_widths[1:]))
        + g_widths[-1] * channels * 16
    )
    d_widths = [model.ndf * 2**i for i in range(n)]
    params += channels * d_widths[0] * 16 + sum(a * b * 16 for a, b in zip(d_widths, d_widths[1:])) + d_widths[-1] * 16
    params += 2 * (sum(g_widths) + sum(d_widths))  # batch norms
    sides = [4 * 2**i for i in range(n)]
    activations = sum(w * s * s for w, s in zip(g_widths, sides)) + channels * size * size
    activations += sum(w * (size // 2 ** (i + 1)) ** 2 for i, w in enumerate(d_widths))
    return params, activations


def _mlp_size(nz: int, out: int, spec: MLPSpec) -> tuple[int, int]:
    pieces = spec.maxout or 1
    widths = [nz, *[spec.width] * spec.depth]
    params = sum(a * b * pieces for a, b in zip(widths, widths[1:])) + widths[-1] * out
    return params, sum(widths) * pieces + out


def training_memory(image_shape: tuple[int, ...], model: ModelConfig, batch_size: int) -> tuple[int, int]:
    """(parameters, bytes) of training the generator and discriminator ``model`` builds, estimated before
    building them: float32 weights, gradients and two Adam moments, and a few copies of each layer's output
    for the batch. An order of magnitude, to refuse sizes no machine could train, not a budget."""
    if len(image_shape) == 1:
        g = _mlp_size(model.nz, image_shape[0], generator_spec(model))
        d = _mlp_size(image_shape[0], 1, discriminator_spec(model))
        params, activations = g[0] + d[0], g[1] + d[1]
    else:
        params, activations = _dcgan_size(image_shape, model)
    return params, 4 * (4 * params + 4 * activations * batch_size)


def latent_shape(image_shape: tuple[int, ...], nz: int) -> tuple[int, ...]:
    """Shape of one latent: nz×1×1 for the DCGAN generator, nz for the MLP."""
    return (nz,) if len(image_shape) == 1 else (nz, 1, 1)


def _windows(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """Every kernel window of ``x`` (N×C×H×W) as one row, ordered (kh, kw, c): N·Ho·Wo × k·k·C (im2col).
    Channels innermost, so that the copy moves contiguous runs of a channels-last tensor."""
    n, c = x.shape[:2]
    padded = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))
    windows = padded.unfold(1, kernel, stride).unfold(2, kernel, stride)  # N Ho Wo C kh kw
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kernel * kernel * c)


def _sum_windows(rows: Tensor, shape: torch.Size, kernel: int, stride: int, padding: int) -> Tensor:
    """The adjoint of ``_windows``: each row added back where its window lies, into a channels-last tensor
    of ``shape`` (N×C×H×W) (col2im).

    Kernel row kh = stride·d + a puts its block at padded row stride·(i + d) + a: for each of the
    ⌈kernel / stride⌉² shifts (d, e) the blocks land unshifted in (a, b) on the output moved by (d, e)
    windows. So col2im is that many adds of whole blocks (4 for the DCGAN's stride-2 layers, not one
    strided add per kernel position, which bf16 runs several times slower on CPU).
    """
    n, c, h, w = shape
    ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    if ho == wo == 1:  # one window overlaps nothing, whatever the stride: one add
        stride = kernel
    m = -(-kernel // stride)
    blocks = rows.view(n, ho, wo, kernel, kernel, c)
    if m * stride != kernel:  # kernel rows past the kernel add zeros
        extra = m * stride - kernel
        blocks = nn.functional.pad(blocks, (0, 0, 0, extra, 0, extra))
    blocks = blocks.view(n, ho, wo, m, stride, m, stride, c)
    # rows stride·r + a of the padded output; more than the windows reach where the convolution's floor left some
    rows_h = max(ho + m - 1, -(-(h + 2 * padding) // stride))
    rows_w = max(wo + m - 1, -(-(w + 2 * padding) // stride))
    if m == 1 and (rows_h, rows_w) == (ho, wo):  # windows that tile the output: the blocks are the output
        out = blocks[:, :, :, 0, :, 0].permute(0, 1, 3, 2, 4, 5).reshape(n, stride * ho, stride * wo, c)
    else:
        out = rows.new_zeros(n, rows_h, stride, rows_w, stride, c)
        for d in range(m):
            for e in range(m):
                out[:, d : d + ho, :, e : e + wo] += blocks[:, :, :, d, :, e].permute(0, 1, 3, 2, 4, 5)
        out = out.view(n, stride * rows_h, stride * rows_w, c)
    return out[:, padding : padding + h, padding : padding + w].permute(0, 3, 1, 2)


def _rows(x: Tensor) -> Tensor:
    """N×C×H×W as N·H·W rows of C channels."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _weight_matrix(weight: Tensor) -> Tensor:
    """A×B×k×k as A × k·k·B, in ``_windows``' order."""
    return weight.permute(0, 2, 3, 1).reshape(len(weight), -1)


class _ConvByMatmul(torch.autograd.Function):
    """A bias-free convolution (``transposed``: its transpose) as matmuls on windows, forward and backward.

    A convolution is ``windows(x) @ W.T``; its transpose with the same weight is the adjoint,
    ``sum_windows(x @ W)``. So both directions of both layers are one matmul each and a window
    copy or sum, and the weight gradient is ``rows(small side).T @ windows(large side)``. The backward
    is made of differentiable operations: second derivatives (R1) work.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, stride: int, padding: int, transposed: bool, shape) -> Tensor:
        kernel = weight.shape[-1]
        if transposed:
            out = _sum_windows(_rows(x) @ _weight_matrix(weight), shape, kernel, stride, padding)
        else:
            out = _windows(x, kernel, stride, padding) @ _weight_matrix(weight).t()
            out = out.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        # a copy, not a view: the next layer may be an in-place activation (autograd forbids views here)
        return out.clone(memory_format=torch.channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # apart from forward: torch.func transforms need it
        x, weight, stride, padding, transposed, shape = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.geometry = stride, padding, transposed, shape

    @staticmethod
    def jvp(ctx, x_tangent: Tensor | None, weight_tangent: Tensor | None, *_) -> Tensor:
        """Forward-mode derivative (``targetgen probe``'s kernel products): the layer is bilinear in (x, W)."""
        x, weight = ctx.saved_tensors
        stride, padding, transposed, shape = ctx.geometry
        terms = (
            [_ConvByMatmul.forward(x_tangent, weight, stride, padding, transposed, shape)]
            if x_tangent is not None
            else []
        )
        if weight_tangent is not None:
            terms.append(_ConvByMatmul.forward(x, weight_tangent, stride, padding, transposed, shape))
        return sum(terms[1:], terms[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, transposed, _ = ctx.geometry
        kernel = weight.shape[-1]
        large, small = (grad, x) if transposed else (x, grad)
        grad_x = grad_weight = None
        # the large side's windows, once: both gradients of a transposed layer read them
        needed = ctx.needs_input_grad[1] or (transposed and ctx.needs_input_grad[0])
        windows = _windows(large, kernel, stride, padding) if needed else None
        if ctx.needs_input_grad[0]:
            if transposed:  # the convolution of grad
                rows = windows @ _weight_matrix(weight).t()
                grad_x = rows.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
            else:  # the transposed convolution of grad
                grad_x = _sum_windows(_rows(grad) @ _weight_matrix(weight), x.shape, kernel, stride, padding)
        if ctx.needs_input_grad[1]:
            grad_weight = _rows(small).t().contiguous() @ windows
            grad_weight = grad_weight.view(len(weight), kernel, kernel, weight.shape[1]).permute(0, 3, 1, 2)
        return grad_x, grad_weight, None, None, None, None


def _check_geometry(conv: nn.Module) -> None:
    kh, kw = conv.kernel_size
    if (
        kh != kw
        or len(set(conv.stride)) > 1
        or len(set(conv.padding)) > 1
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.bias is not None
        or getattr(conv, "output_padding", (0, 0)) != (0, 0)
    ):
        raise ValueError(
            f"{type(conv).__name__}: square kernels, one stride and padding, no dilation, groups, bias or "
            f"output padding; got {conv}"
        )


def _autocast(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``weight`` in autocast's dtype where it is on, as autocast casts a convolution's inputs."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype)
    return x, weight


class _ByMatmul:
    """What both matmul layers share: the geometry check, autocast's cast, the output size and the call."""

    transposed: bool

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_geometry(self)

    def forward(self, input: Tensor) -> Tensor:
        x, weight = _autocast(input, self.weight)
        s, p, k = self.stride[0], self.padding[0], self.kernel_size[0]
        n, _, h, w = x.shape
        if self.transposed:
            sides = ((h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k)
        else:
            sides = ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        return _ConvByMatmul.apply(x, weight, s, p, self.transposed, torch.Size((n, self.out_channels, *sides)))


class MatmulConv2d(_ByMatmul, nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same function) computed by matmul: for layers with small outputs.

    On AMX, oneDNN's bf16 kernels run the DCGAN layers with 4×4 and 1×1 outputs far below matmul speed; as
    matmuls they are 1.5–6× faster, and slower on larger maps (``benchmarks/layers.py``). Equal to
    ``nn.Conv2d`` up to rounding, gradients included (tests/test_models.py).
    """

    transposed = False


class MatmulConvTranspose2d(_ByMatmul, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computed by matmul, for layers with small inputs (as ``MatmulConv2d``)."""

    transposed = True


def _transposed_by_matmul(conv: nn.ConvTranspose2d) -> MatmulConvTranspose2d:
    """``conv`` as a ``MatmulConvTranspose2d`` sharing its weight."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    layer = MatmulConvTranspose2d(conv.in_channels, conv.out_channels, k, s, p, bias=False, device="meta")
    geometry = ("kernel_size", "stride", "padding", "output_padding", "dilation", "groups")
    if conv.bias is not None or any(getattr(layer, g) != getattr(conv, g) for g in geometry):
        raise ValueError(f"_transposed_by_matmul: expected a square, bias-free ConvTranspose2d, got {conv}")
    layer.weight = conv.weight
    return layer


def sampling_copy(generator: nn.Module) -> nn.Module:
    """A copy of ``generator`` for generating many samples without gradients, faster on CPU.

    A copy, so that its train-mode BatchNorm forward passes leave the real
    generator's running statistics alone. For the DCGAN generator on CPU: the
    images channels-last (the layout oneDNN convolves fastest), and the first
    and the image layer computed by matmul (``MatmulConvTranspose2d``), where
    oneDNN's kernels run far below matmul speed: on the 1×1 latent, and
    vectorised over the image's 1 or 3 output channels. The layers between stay
    with oneDNN, which runs them near matmul speed in fp32
    (``python benchmarks/search.py --only digits`` times a digits re-match). The
    copy computes the same function up to float rounding (tests/test_models.py).
    """
    sampler = deepcopy(generator)
    if not isinstance(sampler, Generator):
        return sampler
    sampler = sampler.to(memory_format=torch.channels_last)
    if next(sampler.parameters()).device.type == "cpu":
        convs = [i for i, layer in enumerate(sampler.main) if isinstance(layer, nn.ConvTranspose2d)]
        for i in (convs[0], convs[-1]):
            sampler.main[i] = _transposed_by_matmul(sampler.main[i])
    return sampler


def forward_preserving_buffers(module: nn.Module, *inputs: Tensor) -> Tensor:
    """``module(*inputs)`` in its current mode, without touching its buffers.

    Used for samples and diagnostics: a train-mode BatchNorm forward would
    otherwise update running statistics, and a logged diagnostic must not
    change the training trajectory.
    """
    buffers = {name: buf.clone() for name, buf in module.named_buffers()}
    return functional_call(module, buffers, inputs)


def frozen(module: nn.Module):
    """``module`` as a function of its input alone: weights detached, buffers copied once.

    For many forward passes that differentiate the input only (inverse
    examples): no parameter enters the autograd graph, so nothing is recorded
    for the weights, and the weights and buffers are gathered once instead of
    once per pass. Like ``forward_preserving_buffers``, a train-mode BatchNorm
    updates only the copied statistics, which its train-mode output never reads.
    """
    state = {name: p.detach() for name, p in module.named_parameters()}
    state.update({name: buf.clone() for name, buf in module.named_buffers()})
    return lambda *inputs: functional_call(module, state, inputs)
