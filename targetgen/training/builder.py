"""Building a run: a config becomes data, networks, a target source and a step strategy.

Everything is built in a fixed, seeded order, and building is where every value
that needs the data or the networks is checked, so that a run fails here,
before its directory is touched. ``load_generator`` and ``load_trained``
rebuild a trained run from its directory.
"""

from __future__ import annotations

import os
import platform
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import registry
from ..api import TrainingContext
from ..config import Config, DataConfig, ModelConfig, from_dict, to_dict
from ..data import TrainingData, batches_per_epoch, data_shape, load_data, resolved_data
from ..discriminators import Penalty, check_discriminator
from ..distributed import Processes, check_batch, local_share, wrap
from ..errors import CheckpointError, ConfigError
from ..models import build_discriminator, build_generator, latent_shape, training_memory
from ..registry import STANDARD
from ..regression import RegressionEngine
from .checkpoint import load_checkpoint, restore, seed_everything
from .decomposed import Decomposed
from .run import Run, Strategy
from .rundir import checkpoint_file, config_of_run, resumable_run_dir
from .standard import StandardGAN


def resolve_device(name: str, processes: Processes = Processes()) -> torch.device:
    """The configured device; a distributed process on CUDA gets the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but no CUDA device is available; use cpu or auto")
    if name == "cuda" and processes.distributed:
        torch.cuda.set_device(processes.local_rank)
        return torch.device("cuda", processes.local_rank)
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_memory(shape: tuple[int, ...], model: ModelConfig, batch_size: int) -> None:
    """Refuse network sizes that could never be trained here, before allocating anything."""
    params, needed = training_memory(shape, model, batch_size)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > total:
        raise ConfigError(
            f"model: nz {model.nz}, ngf {model.ngf}, ndf {model.ndf} (hidden {model.hidden} for MLPs) at batch "
            f"{batch_size} make networks of ~{params:.3g} parameters that need ~{needed / 2**30:,.0f} GiB to train, "
            f"more than this machine's {total / 2**30:.0f} GiB; expected smaller widths"
        )


PROCESS_THREADS = torch.get_num_threads()  # torch's default for this process, before any run changes it


def default_threads(data: DataConfig) -> int:
    """CPU threads when train.threads is unset (benchmarks/threads.py measures the choice): 1 for the toy2d
    MLPs; for images, torch's default when $OMP_NUM_THREADS or $MKL_NUM_THREADS set it (compare shares the
    cores that way), else the cores that other work does not keep busy when the run starts: OpenMP threads
    that find their core taken spin against the process running there, and both slow down many times."""
    if data.name == "toy2d":
        return 1
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return PROCESS_THREADS
    return max(1, PROCESS_THREADS - busy_cores())


def busy_cores(samples: int = 5, interval: float = 0.02) -> int:
    """Runnable threads of other processes now (the most of a few looks at /proc/loadavg), 0 where unknown."""
    seen = 0
    for i in range(samples):
        try:
            with open("/proc/loadavg") as load:
                running = int(load.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        seen = max(seen, running - 1)  # this thread is one of them
        if i + 1 < samples:
            time.sleep(interval)
    return seen


# ----------------------------------------------------------------------------- the pieces of a run


def native_bf16(device: torch.device) -> str | None:
    """What computes bf16 products natively on ``device``: AMX or AVX512-BF16 on CPU, the tensor cores of a CUDA
    GPU of compute capability >= 8; None where bf16 would be emulated."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} tensor cores" if major >= 8 else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: the flags say the same
    flags = _cpu_flags()
    if (amx() if amx else False) or "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def _cpu_flags() -> set[str]:
    return {flag for line in _cpuinfo("flags") for flag in line.split()}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``lscpu``'s), for the records of timed runs: speeds differ between machines."""
    names = _cpuinfo("model name", cpuinfo)
    return names[0] if names else platform.processor() or "unknown"


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> list[str]:
    """The values of ``key`` in ``path``, one per logical CPU; none when it cannot be read (not Linux)."""
    try:
        with open(path) as info:
            return [line.split(":", 1)[1].strip() for line in info if line.split(":", 1)[0].strip() == key]
    except OSError:
        return []


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: its device, CPU threads and numeric format, resolved from the config."""

    device: torch.device
    threads: int
    drop_last: bool
    precision: str  # fp32 | bf16
    channels_last: bool
    why: str  # what decided the numeric format, for the line printed at the start
    small_maps_by_matmul: bool = False  # bf16 on AMX: the networks' 4×4-side layers as matmuls (models.MatmulConv2d)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        threads = f", {self.threads} CPU thread{'s' * (self.threads > 1)}" if self.device.type == "cpu" else ""
        layout = "channels-last" if self.channels_last else "contiguous"
        matmul = ", 4×4 layers by matmul" if self.small_maps_by_matmul else ""
        return f"{self.device}{threads}, {self.precision} ({self.why}), {layout}{matmul}"


def numeric_format(config: Config, device: torch.device) -> tuple[str, bool, str]:
    """``train.precision`` and ``train.channels_last`` resolved for ``device``: (precision, channels-last, why)."""
    t, images = config.train, config.data.name != "toy2d"
    native = native_bf16(device)
    if t.precision == "auto":
        precision = "bf16" if native and images else "fp32"
        why = f"auto: {native}" if native and images else "auto: no native bf16" if images else "auto: MLPs"
    else:
        precision, why = t.precision, "train.precision"
    if precision == "bf16" and not native:
        warnings.warn(
            f"train.precision: bf16 on {device}, which computes bf16 only by emulation (no AMX or AVX512-BF16, "
            "no tensor cores of compute capability >= 8): slower than fp32; auto or fp32 is faster",
            stacklevel=2,
        )
    if t.channels_last is True and not images:
        raise ConfigError("train.channels_last: a memory layout for images; toy2d data are points")
    channels_last = t.channels_last if t.channels_last != "auto" else images and device.type == "cpu"
    return precision, channels_last, why


def runtime(config: Config, processes: Processes) -> Runtime:
    """Device, threads, drop_last and the numeric format for ``config``; sets torch's threads and seeds."""
    t = config.train
    device = resolve_device(t.device, processes)
    if t.cudnn_benchmark:
        if device.type != "cuda":
            raise ConfigError(f"train.cudnn_benchmark: needs a CUDA device, the run uses {device}")
        torch.backends.cudnn.benchmark = True
    threads = t.threads or default_threads(config.data)
    torch.set_num_threads(threads)
    drop_last = t.drop_last
    if drop_last is None:
        drop_last = processes.distributed
        if processes.distributed and processes.is_main:
            print(
                f"train.drop_last: true for {processes.world_size} processes (each needs an equal share of every "
                "global batch; the last len(data) mod batch_size images of each epoch are skipped)"
            )
    check_batch(t.batch_size, drop_last, processes)
    precision, channels_last, why = numeric_format(config, device)
    # oneDNN's bf16 kernels for these layers are slow on AMX; elsewhere they were not measured slower
    small_maps_by_matmul = precision == "bf16" and device.type == "cpu" and native_bf16(device) == "AMX"
    seed_everything(t.seed)
    return Runtime(device, threads, drop_last, precision, channels_last, why, small_maps_by_matmul)


@dataclass
class Networks:
    """The generator as checkpoints see it and as steps call it, and what builds discriminators."""

    generator: nn.Module  # the plain network
    trained_generator: nn.Module  # inside autocast / DDP when configured
    make_discriminator: Callable[..., nn.Module]
    sample_latents: Callable[[int], Tensor]
    latent_shape: tuple[int, ...]


def networks(config: Config, shape: tuple[int, ...], rt: Runtime, processes: Processes) -> Networks:
    m = config.model
    check_memory(shape, m, config.train.batch_size)
    z_shape = latent_shape(shape, m.nz)
    netG = build_generator(shape, m, rt.small_maps_by_matmul).to(rt.device, memory_format=rt.layout)

    def sample_latents(count: int) -> Tensor:
        # Every process draws the latents of the whole global batch (the RNG streams stay
        # identical) and keeps its own share: the same latents a single process would use.
        return local_share(torch.randn(count * processes.world_size, *z_shape, device=rt.device), processes)

    def make_discriminator(sigmoid: bool = True) -> nn.Module:
        netD = build_discriminator(shape, m, sigmoid, config.discriminator.spectral_norm, rt.small_maps_by_matmul)
        netD = netD.to(rt.device, memory_format=rt.layout)
        return wrap(netD, processes, rt.device, rt.bf16)

    return Networks(netG, wrap(netG, processes, rt.device, rt.bf16), make_discriminator, sample_latents, z_shape)


def strategy(
    config: Config, nets: Networks, data: TrainingData, rt: Runtime, total_steps: int, processes: Processes
) -> tuple[Strategy, Any]:
    """The standard GAN's step, or a target source with the regression engine; and the resolved options."""
    name = config.targets.name
    options = from_dict(registry.options_class(name), config.targets.options, "targets.options")
    check_discriminator(config.discriminator, getattr(options, "d_loss", None), processes.world_size)
    penalty = Penalty.of(config.discriminator)
    if name == STANDARD:
        step = StandardGAN(
            options,
            nets.trained_generator,
            nets.make_discriminator(sigmoid=True),
            nets.sample_latents,
            config.targets.d_steps,
            penalty,
        )
        return step, options
    context = TrainingContext(
        generator=nets.trained_generator,
        sample_latents=nets.sample_latents,
        dataset=data.dataset,
        image_shape=data.image_shape,
        device=rt.device,
        rank=processes.rank,
        world_size=processes.world_size,
        total_steps=total_steps,
        latent_shape=nets.latent_shape,
        seed=config.train.seed,
        make_discriminator=nets.make_discriminator,
        precision=rt.precision,
        penalty=penalty,
    )
    pool = getattr(options, "pool", None)  # a source fitted on pools of pairs (cfg)
    if isinstance(pool, int) and pool < config.regression.pool_batch:
        raise ConfigError(
            f"targets.options.pool: {pool} pairs, fewer than one minibatch of regression.pool_batch "
            f"({config.regression.pool_batch}); expected at least {config.regression.pool_batch}"
        )
    source = registry.load("targets", name, "targets.name")(options, context)
    d = config.discriminator
    if (d.spectral_norm or penalty.active) and source.discriminator() is None:
        key = "discriminator.spectral_norm" if d.spectral_norm else "discriminator.r1" if d.r1 else "discriminator.r2"
        raise ConfigError(f"{key}: regularizes a discriminator; '{name}' trains none (standard, inversion and cfg do)")
    if "ssim" in config.regression.loss and len(data.image_shape) != 3:
        raise ConfigError("regression.loss.ssim: SSIM needs images; toy2d data are points")
    engine = RegressionEngine(nets.trained_generator, config.regression, total_steps, processes.world_size)
    return Decomposed(source, engine, nets.sample_latents, config.targets.d_steps), options


def build_run(config: Config, processes: Processes = Processes()) -> Run:
    """Build data, models and strategy, in a fixed, seeded order. ``config`` is left as it is; the run's
    ``config`` is the resolved one (threads, drop_last, image shape, every target option)."""
    t = config.train
    rt = runtime(config, processes)
    data = load_data(config.data)
    n = len(data.dataset)
    if t.batch_size > n:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is larger than the data set ({n:,} "
            f"{'points' if len(data.image_shape) == 1 else 'images'}); expected at most {n}"
        )
    steps_per_epoch = batches_per_epoch(n, t.batch_size, rt.drop_last)
    total_steps = t.steps if t.steps is not None else t.epochs * steps_per_epoch
    nets = networks(config, data.image_shape, rt, processes)
    step, options = strategy(config, nets, data, rt, total_steps, processes)
    resolved = replace(
        config,
        data=resolved_data(config.data, data.image_shape),
        train=replace(
            t, threads=rt.threads, drop_last=rt.drop_last, precision=rt.precision, channels_last=rt.channels_last
        ),
        targets=replace(config.targets, options=to_dict(options)),  # the resolved config shows every option
    )
    # Fixed noise for sample grids, from its own generator so that it draws nothing from the training RNG.
    count = 64 if len(data.image_shape) == 3 else 1024
    fixed_noise = torch.randn(count, *nets.latent_shape, generator=torch.Generator().manual_seed(t.seed + 1))
    return Run(
        resolved,
        data,
        rt.device,
        nets.generator,
        step,
        fixed_noise.to(rt.device),
        steps_per_epoch,
        total_steps,
        processes=processes,
        runtime=rt.describe(),
    )


@dataclass
class TrainedGenerator:
    """A run's generator from its checkpoint, built without its data or target source."""

    config: Config
    generator: nn.Module  # the trained network
    sampling_generator: nn.Module  # what samples come from: the EMA copy when the run kept one, as the source uses it
    discriminator: nn.Module | None  # the run's discriminator (its logit: no final Sigmoid), for --refine
    latent_shape: tuple[int, ...]
    image_shape: tuple[int, ...]
    device: torch.device
    step: int


def load_generator(run_dir: Path, checkpoint: str = "last") -> TrainedGenerator:
    """The generator of one of ``run_dir``'s checkpoints (``rundir.checkpoint_file``). Needs config.yaml and the
    checkpoint, never the training data: a run can be sampled after its images have moved."""
    config = config_of_run(run_dir)
    resumable_run_dir(run_dir)
    path = checkpoint_file(run_dir, checkpoint)
    state = load_checkpoint(path, targets=config.targets.name)
    m = config.model
    shape = data_shape(config.data)
    device = resolve_device(config.train.device)
    check_memory(shape, m, 1)
    generator = build_generator(shape, m).to(device)
    sampling = generator

    def make_discriminator(sigmoid: bool = False) -> nn.Module:
        return build_discriminator(shape, m, False, config.discriminator.spectral_norm).to(device)

    discriminator = None
    try:
        generator.load_state_dict(state["generator"])
        if config.targets.name != STANDARD and config.regression.ema is not None:
            engine = RegressionEngine(generator, config.regression, total_steps=1)
            engine.load_state_dict(state["strategy"]["regression"])
            sampling = engine.sampling_generator()
        if config.targets.name != STANDARD:
            source = registry.load("targets", config.targets.name, "targets.name")
            options = from_dict(source.Options, config.targets.options, "targets.options")
            sampling = source.restored_sampler(options, state["strategy"]["source"], sampling, make_discriminator)
        if (found := _discriminator_state(state["strategy"])) is not None:
            discriminator = make_discriminator()
            discriminator.load_state_dict(found)  # the same weights with or without the final Sigmoid
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} does not fit the generator of {run_dir / 'config.yaml'}: {first}"
        ) from None
    return TrainedGenerator(
        config, generator, sampling, discriminator, latent_shape(shape, m.nz), shape, device, state["step"]
    )


def _discriminator_state(state: dict) -> dict | None:
    """The first discriminator in a strategy's checkpoint state (standard's, inversion's, cfg's, a mix member's)."""
    if isinstance(state.get("netD"), dict):
        return state["netD"]
    for value in state.values():
        if isinstance(value, dict) and (found := _discriminator_state(value)) is not None:
            return found
    return None


def load_trained(run_dir: Path, checkpoint: str = "last") -> Run:
    """Rebuild a whole run (data, networks, target source) from its directory and load one of its checkpoints."""
    config = config_of_run(run_dir)
    path = checkpoint_file(run_dir, checkpoint)
    run = build_run(config)
    run.step = restore(run, path, allow_config_change=True)[0].step
    return run
