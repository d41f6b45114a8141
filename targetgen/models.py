"""DCGAN generator and discriminator (PyTorch DCGAN tutorial), and MLPs for toy2d.

At 64×64×3 with ngf = ndf = 64 these are the tutorial's networks layer for
layer (3,576,704 and 2,765,568 parameters). Other sizes add or remove one
stride-2 block per factor of two, keeping the tutorial's channel doubling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError

IMAGE_SIZES = (16, 32, 64, 128)


def _blocks(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ConfigError(
            f"data.image_size: the DCGAN models support {', '.join(map(str, IMAGE_SIZES))} px, got {image_size}"
        )
    return int(math.log2(image_size)) - 2  # stride-2 layers between 4×4 and the image


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        n = _blocks(image_size)
        layers: list[nn.Module] = [
            # input is Z, going into a convolution
            nn.ConvTranspose2d(nz, ngf * 2 ** (n - 1), 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 2 ** (n - 1)),
            nn.ReLU(True),
        ]
        for i in range(n - 1, 0, -1):  # state size doubles, channels halve
            layers += [
                nn.ConvTranspose2d(ngf * 2**i, ngf * 2 ** (i - 1), 4, 2, 1, bias=False),
                nn.BatchNorm2d(ngf * 2 ** (i - 1)),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64, sigmoid: bool = True):
        super().__init__()
        n = _blocks(image_size)
        layers: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for i in range(1, n):
            layers += [
                nn.Conv2d(ndf * 2 ** (i - 1), ndf * 2**i, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * 2**i),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * 2 ** (n - 1), 1, 4, 1, 0, bias=False))
        # The tutorial ends in Sigmoid for BCELoss; other losses want raw scores.
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.main = nn.Sequential(*layers)
        self.outputs_probabilities = sigmoid

    def forward(self, input: Tensor) -> Tensor:
        return self.main(input)


class MLPGenerator(nn.Module):
    """Generator for 2-D point data (toy2d)."""

    def __init__(self, nz: int, hidden: int = 128, out_dim: int = 2):
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(nz, hidden), nn.ReLU(True),
            nn.Linear(hidden, hidden), nn.ReLU(True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z.flatten(1))


class MLPDiscriminator(nn.Module):
    def __init__(self, hidden: int = 128, in_dim: int = 2, sigmoid: bool = True):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, True),
            nn.Linear(hidden, 1),
        ]
        if sigmoid:
            layers.append(nn.Sigmoid())
        self.main = nn.Sequential(*layers)
        self.outputs_probabilities = sigmoid

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def weights_init(m: nn.Module) -> None:
    """The tutorial's initialisation: conv N(0, 0.02), BatchNorm N(1, 0.02), bias 0."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


def build_generator(image_shape: tuple[int, ...], nz: int, ngf: int, hidden: int) -> nn.Module:
    if len(image_shape) == 1:
        return MLPGenerator(nz, hidden, image_shape[0])
    netG = Generator(nz, ngf, image_shape[0], image_shape[1])
    netG.apply(weights_init)
    return netG


def build_discriminator(image_shape: tuple[int, ...], ndf: int, hidden: int, sigmoid: bool = True) -> nn.Module:
    if len(image_shape) == 1:
        return MLPDiscriminator(hidden, image_shape[0], sigmoid)
    netD = Discriminator(ndf, image_shape[0], image_shape[1], sigmoid)
    netD.apply(weights_init)
    return netD


def latent_shape(image_shape: tuple[int, ...], nz: int) -> tuple[int, ...]:
    """Shape of one latent: nz×1×1 for the DCGAN generator, nz for the MLP."""
    return (nz,) if len(image_shape) == 1 else (nz, 1, 1)


def forward_preserving_buffers(module: nn.Module, *inputs: Tensor) -> Tensor:
    """``module(*inputs)`` in its current mode, without touching its buffers.

    Used for samples and diagnostics: a train-mode BatchNorm forward would
    otherwise update running statistics, and a logged diagnostic must not
    change the training trajectory.
    """
    buffers = {name: buf.clone() for name, buf in module.named_buffers()}
    return functional_call(module, buffers, inputs)
