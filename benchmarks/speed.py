"""Speed of targetgen's training steps against the machine's limit, measured in one process.

For each thread count and image shape: the PyTorch DCGAN tutorial's loop (fp32, the baseline), and the
standard, decomposed (N1 = N2 = 1) and IMLE steps in every numeric format — precision (fp32, bf16 autocast)
× memory format (contiguous, channels-last), × torch.compile (off, on) with ``--compile``. Reported per
contender: images/s (median of interleaved repetitions, in alternating order, so that drift of the machine
affects every contender alike), the ratio to the tutorial loop, the FLOPs of one step
(``torch.utils.flop_counter``'s formulas), and the share of the machine's peak that makes: the peak
is a 2048² matmul in the same precision on the same threads, measured in the same run.

The goals (the default standard step ÷ the tutorial loop, the default decomposed step's time ÷ the
standard one's) are judged on paired ratios: after the table, the three contenders they involve run
back to back ``--paired`` times, each ratio is taken within one such round (seconds apart), and the
median, quartiles and range of those ratios are reported. A machine whose speed drifts over minutes moves
both sides of a pair alike.

    python benchmarks/speed.py                     # both shapes, 1 and 2 threads (15–20 minutes alone)
    python benchmarks/speed.py --compile           # and every contender compiled (compile time apart)
    python benchmarks/speed.py --quick --threads 1 --shapes 32x32x1
    python benchmarks/speed.py --goals-only --paired 30   # only the paired goal ratios
    python benchmarks/speed.py --json speed.json   # the numbers, for docs/performance.md

Run it alone: a second process on the cores distorts every figure.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from targetgen.api import Batch
from targetgen.config import load_config
from targetgen.training import build_run
from targetgen.training.builder import native_bf16, numeric_format

SHAPES = {
    "64x64x3": ["data.image_size=64", "data.channels=3", "model.ngf=64", "model.ndf=64"],
    "32x32x1": ["data.image_size=32", "data.channels=1", "model.ngf=32", "model.ndf=32"],
}
STEPS = {"standard": [], "decomposed N1=N2=1": [], "imle": ["targets.options.samples_factor=1"]}
SOURCE = {"standard": "standard", "decomposed N1=N2=1": "inversion", "imle": "imle"}
BATCH = 128


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
    """A built run of ``targets`` at ``shape`` and random images of that shape (the same for every contender)."""
    config = load_config(None, [*SHAPES[shape], f"train.batch_size={BATCH}", "train.loggers=jsonl", *extra], targets)
    run = build_run(config)
    images = torch.randn(512, *run.data.image_shape).clamp(-1, 1)
    if run.config.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return run, images


def compile_networks(run) -> None:
    """The networks the step calls, under torch.compile (default mode)."""
    strategy = run.strategy
    if hasattr(strategy, "netG"):
        strategy.netG, strategy.netD = torch.compile(strategy.netG), torch.compile(strategy.netD)
    else:
        strategy.regression.generator = torch.compile(strategy.regression.generator)
        source = strategy.source
        if hasattr(source, "netD"):
            source.netD = torch.compile(source.netD)


@dataclass
class Contender:
    name: str
    fn: functools.partial
    precision: str = "fp32"
    flops: float = 0.0  # of one step
    compile_s: float | None = None
    rates: list[float] = field(default_factory=list)


class CountFlops(TorchDispatchMode):
    """FlopCounterMode's formulas (matmuls, convolutions and their backward passes), applied by a plain dispatch
    mode: FlopCounterMode's own module tracker breaks autograd.grad on an input (the inverse examples)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(fn) -> float:
    """FLOPs of one call of ``fn``."""
    with CountFlops() as counter:
        fn()
    return counter.total


def peak(precision: str) -> float:
    """GFLOP/s of the best of five 2048² matmuls in ``precision`` on the current threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - started) / 1e9)
    return best


def contenders(shape: str, steps: int, with_compile: bool) -> list[Contender]:
    tutorial_run, images = make(shape, "standard", "train.precision=fp32", "train.channels_last=false")
    netG, netD = copy.deepcopy(tutorial_run.generator), copy.deepcopy(tutorial_run.strategy.netD)
    found = [Contender("tutorial loop (fp32)", functools.partial(tutorial_loop, netG, netD, images, steps, BATCH, 100))]
    for compile_ in (False, True) if with_compile else (False,):
        for step, extra in STEPS.items():
            for precision in ("fp32", "bf16"):
                for layout in ("contiguous", "channels-last"):
                    run, data = make(
                        shape,
                        SOURCE[step],
                        *extra,
                        f"train.precision={precision}",
                        f"train.channels_last={layout == 'channels-last'}",
                    )
                    if step == "imle":
                        run.strategy.on_epoch_start(0)  # its matching: not part of a step's time
                    name = f"{step}, {precision}, {layout}{', compiled' if compile_ else ''}"
                    contender = Contender(
                        name, functools.partial(strategy_loop, run.strategy, data, steps, BATCH), precision
                    )
                    if compile_:
                        compile_networks(run)
                        started = time.perf_counter()
                        contender.fn()
                        contender.compile_s = time.perf_counter() - started
                    found.append(contender)
    return found


def timed(c: Contender, steps: int) -> float:
    """Images/s of one call of ``c``."""
    started = time.perf_counter()
    c.fn()
    return steps * BATCH / (time.perf_counter() - started)


def goal_names(default: str) -> list[str]:
    """The contenders the goals compare: the tutorial loop, the default standard and decomposed steps."""
    return ["tutorial loop (fp32)", f"standard, {default}", f"decomposed N1=N2=1, {default}"]


def paired_goals(found: list[Contender], default: str, steps: int, rounds: int) -> dict:
    """The goal ratios, each taken within one round of the three contenders they involve (seconds apart)."""
    trio = [next(c for c in found if c.name == name) for name in goal_names(default)]
    speedups, time_ratios = [], []
    for round_ in range(rounds):
        order = range(3) if round_ % 2 == 0 else range(2, -1, -1)
        rate = {i: timed(trio[i], steps) for i in order}
        speedups.append(rate[1] / rate[0])
        time_ratios.append(rate[1] / rate[2])
    return {
        "rounds": rounds,
        "standard_vs_tutorial": summary(speedups),
        "decomposed_time_vs_standard": summary(time_ratios),
    }


def summary(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values), "values": values}


def measure(threads: int, shape: str, reps: int, rounds: int, with_compile: bool, default: str) -> dict:
    torch.set_num_threads(threads)
    steps = 1 if shape == "64x64x3" else 6
    peaks = {p: peak(p) for p in ("fp32", "bf16")}
    found = contenders(shape, steps, with_compile)
    if not reps:  # the goals only
        found = [c for c in found if c.name in goal_names(default)]
    torch.set_num_threads(threads)  # building a run sets the threads from its config
    for c in found:
        c.fn()  # warm-up (oneDNN picks and caches its kernels)
        c.flops = step_flops(c.fn) / steps
    for rep in range(reps):
        for c in found if rep % 2 == 0 else found[::-1]:  # position in the round favours no one
            c.rates.append(timed(c, steps))
    goals = paired_goals(found, default, steps, rounds) if rounds else None
    rows = []
    base = statistics.median(found[0].rates) if reps else None
    for c in found if reps else []:
        rate = statistics.median(c.rates)
        achieved = c.flops * rate / BATCH / 1e9
        rows.append(
            {
                "contender": c.name,
                "images_per_s": rate,
                "vs_tutorial": rate / base,
                "gflop_per_step": c.flops / 1e9,
                "gflop_per_s": achieved,
                "share_of_peak": achieved / peaks[c.precision],
                "compile_s": c.compile_s,
            }
        )
    return {
        "threads": threads,
        "shape": shape,
        "batch": BATCH,
        "reps": reps,
        "peak_gflop_per_s": peaks,
        "rows": rows,
        "paired_goals": goals,
    }


def report(result: dict, default: str) -> None:
    print(f"\n### {result['shape']}, batch {result['batch']}, {result['threads']} thread(s)")
    p = result["peak_gflop_per_s"]
    print(f"matmul peak (2048², same threads): fp32 {p['fp32']:.0f} GFLOP/s, bf16 {p['bf16']:.0f} GFLOP/s\n")
    if result["rows"]:
        print(f"median of {result['reps']} interleaved repetitions:\n")
        print("| contender | images/s | ÷ tutorial | GFLOP/step | GFLOP/s | share of peak | compile s |")
        print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        mark = " **(default)**" if r["contender"].endswith(default) and "compiled" not in r["contender"] else ""
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "–"
        print(
            f"| {r['contender']}{mark} | {r['images_per_s']:.1f} | {r['vs_tutorial']:.2f} | "
            f"{r['gflop_per_step']:.1f} | {r['gflop_per_s']:.1f} | {100 * r['share_of_peak']:.1f} % | {compile_s} |"
        )
    goals = result["paired_goals"]
    if goals:
        goal = 2.5 if result["shape"] == "64x64x3" else 1.8
        speedup, time_ratio = goals["standard_vs_tutorial"], goals["decomposed_time_vs_standard"]
        print(
            f"\npaired over {goals['rounds']} rounds, median [quartiles] (range):\n"
            f"  default standard step ÷ fp32 tutorial loop = {spread(speedup)} (goal >= {goal})\n"
            f"  default decomposed time ÷ standard time = {spread(time_ratio)} (goal <= 1.0)"
        )


def spread(s: dict) -> str:
    return f"{s['median']:.2f} [{s['q1']:.2f}–{s['q3']:.2f}] ({s['min']:.2f}–{s['max']:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 5, 10 paired rounds")
    parser.add_argument("--paired", type=int, help="rounds of the paired goal measurement (default 20; 0: none)")
    parser.add_argument("--goals-only", action="store_true", help="only the paired goal ratios, no table")
    parser.add_argument("--shapes", default="64x64x3,32x32x1")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--compile", action="store_true", help="also every contender under torch.compile")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    if args.paired is not None and (args.paired < 0 or args.paired == 1):
        parser.error(f"--paired {args.paired}: expected 0 (no paired measurement) or at least 2 rounds")
    if args.goals_only and args.paired == 0:
        parser.error("--goals-only with --paired 0 measures nothing: expected at least 2 rounds")
    cpu = torch.device("cpu")
    precision, channels_last, why = numeric_format(load_config(None), cpu)
    default = f"{precision}, {'channels-last' if channels_last else 'contiguous'}"
    print(
        f"torch {torch.__version__}; native bf16: {native_bf16(cpu) or 'none'}; "
        f"train.precision/channels_last auto → {default} ({why})"
    )
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        for shape in args.shapes.split(","):
            reps = 0 if args.goals_only else 3 if args.quick else 5
            rounds = args.paired if args.paired is not None else 10 if args.quick else 20
            results.append(measure(threads, shape, reps, rounds, args.compile, default))
            report(results[-1], default)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"torch": torch.__version__, "default": default, "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
