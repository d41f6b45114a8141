"""Speed of targetgen's training steps, measured in one process.

1. targetgen's standard trainer step vs a minimal tutorial-faithful loop on the
   same models and data (goal: ratio >= 1.0, the framework adds no overhead);
2. the decomposed step vs the standard step (goal: <= 1.0 at N1 = N2 = 1), and
   N1 in {1, 2, 5}, N2 in {1, 2}.

    python benchmarks/speed.py              # both shapes: 64×64×3 and 32×32×1
    python benchmarks/speed.py --quick      # fewer repetitions

Images/s are medians over interleaved repetitions, in alternating order, so
that slow drift of the machine affects every contender alike.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn as nn
import torch.optim as optim

from targetgen.api import Batch
from targetgen.config import load_config
from targetgen.training import build_run

SHAPES = {
    "64x64x3": ["data.image_size=64", "data.channels=3", "model.ngf=64", "model.ndf=64"],
    "32x32x1": ["data.image_size=32", "data.channels=1", "model.ngf=32", "model.ndf=32"],
}


def tutorial_loop(netG, netD, images, steps, batch_size, nz):
    """The tutorial's loop body, nothing else."""
    criterion = nn.BCELoss()
    optimizerD = optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
    for i in range(steps):
        real_cpu = images[(i * batch_size) % len(images) :][:batch_size]
        netD.zero_grad()
        b_size = real_cpu.size(0)
        label = torch.full((b_size,), 1.0, dtype=torch.float)
        output = netD(real_cpu).view(-1)
        errD_real = criterion(output, label)
        errD_real.backward()
        noise = torch.randn(b_size, nz, 1, 1)
        fake = netG(noise)
        label.fill_(0.0)
        output = netD(fake.detach()).view(-1)
        errD_fake = criterion(output, label)
        errD_fake.backward()
        optimizerD.step()
        netG.zero_grad()
        label.fill_(1.0)
        output = netD(fake).view(-1)
        errG = criterion(output, label)
        errG.backward()
        optimizerG.step()
        errD_real.item(), errG.item()  # the tutorial logs these


def strategy_loop(strategy, images, steps, batch_size):
    for i in range(steps):
        real = images[(i * batch_size) % len(images) :][:batch_size]
        strategy.step(Batch(real, torch.arange(len(real))), i, log=False)


def make(shape, targets, *extra):
    config = load_config(None, [*SHAPES[shape], "train.batch_size=128", *extra], targets)
    run = build_run(config)
    images = torch.randn(512, *run.data.image_shape).clamp(-1, 1)  # same data for every contender
    return run, images


def timed(fn, images_per_call):
    start = time.perf_counter()
    fn()
    return images_per_call / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--shapes", default="64x64x3,32x32x1")
    args = parser.parse_args()
    reps = 3 if args.quick else 5
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        steps = 3 if shape == "64x64x3" else 10
        images_per_call = steps * 128
        std_run, images = make(shape, "standard")
        netG, netD = copy.deepcopy(std_run.generator), copy.deepcopy(std_run.strategy.netD)
        contenders = {
            "tutorial loop": functools.partial(tutorial_loop, netG, netD, images, steps, 128, 100),
            "standard (targetgen)": functools.partial(strategy_loop, std_run.strategy, images, steps, 128),
        }
        for n1 in (1, 2, 5):
            for n2 in (1, 2):
                run, _ = make(shape, "inversion", f"targets.options.steps={n1}", f"regression.steps={n2}")
                contenders[f"decomposed N1={n1} N2={n2}"] = functools.partial(
                    strategy_loop, run.strategy, images, steps, 128
                )
        for fn in contenders.values():  # warm-up
            fn()
        rates = {name: [] for name in contenders}
        for rep in range(reps):
            # Alternate the order so that position in the round (caches,
            # clock boost) favours no contender.
            for name in list(contenders) if rep % 2 == 0 else list(contenders)[::-1]:
                rates[name].append(timed(contenders[name], images_per_call))
        median = {name: statistics.median(r) for name, r in rates.items()}
        base = median["standard (targetgen)"]
        print(f"\n{shape}, batch 128, {torch.get_num_threads()} threads, median of {reps}")
        print("| contender | images/s | ÷ standard |\n|---|---|---|")
        for name, rate in median.items():
            print(f"| {name} | {rate:.1f} | {rate / base:.2f} |")
        print(
            f"framework overhead: standard (targetgen) ÷ tutorial loop = {base / median['tutorial loop']:.2f} (goal "
            ">= 1.0)"
        )
        print(f"decomposed N1=N2=1 time ÷ standard time = {base / median['decomposed N1=1 N2=1']:.2f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
