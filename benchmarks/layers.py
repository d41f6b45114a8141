"""Each DCGAN convolution in bf16 autocast and channels-last, oneDNN's kernel against the same layer by matmul.

Why ``models.MatmulConv2d`` / ``MatmulConvTranspose2d`` compute the layers on the 4×4 side under bf16 on
AMX: per layer of the 64×64×3 (ngf = ndf = 64) and 32×32×1 (32) networks, batch 128, the median time of
a forward and backward pass (ms), with the input gradient (as in the generator's pass through D) and
without it (as in D's own update), and the speed-up of the matmul layer.

    python benchmarks/layers.py                 # 1 thread
    python benchmarks/layers.py --threads 2

Run it alone: a second process on the cores distorts every figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from targetgen.models import Discriminator, Generator, MatmulConv2d, MatmulConvTranspose2d

BATCH = 128
SHAPES = {"64x64x3": (64, 3, 64), "32x32x1": (32, 1, 32)}  # image side, channels, ngf = ndf


def dcgan_layers(side: int, channels: int, width: int) -> list[tuple[str, nn.Module, int]]:
    """Every convolution of targetgen's DCGAN networks at this shape, as (network, layer, input side):
    D's, then G's, read off one forward pass of each."""
    found = []
    for net, network, x in (
        ("D", Discriminator(width, channels, side), torch.zeros(1, channels, side, side)),
        ("G", Generator(100, width, channels, side), torch.zeros(1, 100, 1, 1)),
    ):
        for layer in network.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.register_forward_hook(lambda m, inputs, out, net=net: found.append((net, m, inputs[0].shape[-1])))
        with torch.no_grad():
            network.eval()(x)
    return found


def pass_ms(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, input_grad: bool, reps: int) -> float:
    """Median ms of a forward and backward pass of ``layer`` under bf16 autocast."""
    times = []
    for rep in range(reps + 1):
        xx = x.detach().requires_grad_(input_grad)
        layer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            out = layer(xx)
        out.backward(grad)
        if rep:  # the first pass picks oneDNN's kernels
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH}, bf16 autocast, channels-last\n")
    print("| shape | layer | output side | with input grad: oneDNN / matmul ms | × | without: oneDNN / matmul ms | × |")
    print("|---|---|---|---|---|---|---|")
    for shape, dimensions in SHAPES.items():
        for net, layer, side in dcgan_layers(*dimensions):
            c_in, c_out, stride, padding = layer.in_channels, layer.out_channels, layer.stride[0], layer.padding[0]
            if net == "D":
                library = nn.Conv2d(c_in, c_out, 4, stride, padding, bias=False)
                matmul = MatmulConv2d(c_in, c_out, 4, stride, padding, bias=False)
            else:
                library = nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
                matmul = MatmulConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False)
            library = library.to(memory_format=torch.channels_last)
            matmul.load_state_dict(library.state_dict())
            x = torch.randn(BATCH, c_in, side, side).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                out = library(x)
            grad = torch.randn_like(out)
            with_grad = [pass_ms(m, x, grad, True, args.reps) for m in (library, matmul)]
            without = [pass_ms(m, x, grad, False, args.reps) for m in (library, matmul)]
            print(
                f"| {shape} | {net} {c_in}→{c_out} | {out.shape[-1]} | {with_grad[0]:.1f} / {with_grad[1]:.1f} | "
                f"{with_grad[0] / with_grad[1]:.2f} | {without[0]:.1f} / {without[1]:.1f} | "
                f"{without[0] / without[1]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
