"""Building a run: a config becomes data, networks, a target source and a step strategy.

Everything is built in a fixed, seeded order, and building is where every value
that needs the data or the networks is checked, so that a run fails here,
before its directory is touched. ``load_generator`` and ``load_trained``
rebuild a trained run from its directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import registry
from ..registry import STANDARD
from ..api import TargetGenerator, TrainingContext
from ..config import Config, DataConfig, ModelConfig, from_dict, to_dict
from ..data import TrainingData, batches_per_epoch, data_shape, load_data
from ..distributed import Processes, check_batch, local_share, wrap
from ..errors import CheckpointError, ConfigError
from ..models import build_discriminator, build_generator, latent_shape, training_memory
from ..regression import RegressionEngine
from .checkpoint import load_checkpoint, restore, seed_everything
from .rundir import CHECKPOINT, config_of_run, current_run_dir, resumable_run_dir
from .standard import StandardGAN, StandardOptions
from .trainer import Decomposed


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
    """CPU threads when train.threads is unset (benchmarks/threads.py measures the choice)."""
    return 1 if data.name == "toy2d" else PROCESS_THREADS


def _check_gpu_options(config: Config, device: torch.device) -> None:
    """cudnn.benchmark needs CUDA; bf16 and channels-last also run on CPU (slowly: they are meant for GPUs)."""
    t = config.train
    if t.cudnn_benchmark:
        if device.type != "cuda":
            raise ConfigError(f"train.cudnn_benchmark: needs a CUDA device, the run uses {device}")
        torch.backends.cudnn.benchmark = True


@dataclass
class Run:
    """Everything built from a config, in a fixed, seeded order."""

    config: Config
    data: TrainingData
    device: torch.device
    generator: nn.Module  # the plain network (checkpoints, samples, evaluation)
    strategy: StandardGAN | Decomposed
    fixed_noise: Tensor
    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimizer steps done, once loaded from a checkpoint
    processes: Processes = Processes()

    @property
    def source(self) -> TargetGenerator | None:
        return self.strategy.source if isinstance(self.strategy, Decomposed) else None




def options_class(source: str) -> type:
    """The dataclass of ``targets.options`` for a source (or the standard GAN)."""
    return StandardOptions if source == STANDARD else registry.load("targets", source, "targets.name").Options


def build_run(config: Config, processes: Processes = Processes()) -> Run:
    """Build data, models and strategy. Resolves the target options in ``config`` in place."""
    t, m = config.train, config.model
    device = resolve_device(t.device, processes)
    _check_gpu_options(config, device)
    t.threads = t.threads or default_threads(config.data)
    torch.set_num_threads(t.threads)
    if t.drop_last is None:
        t.drop_last = processes.distributed
        if processes.distributed and processes.is_main:
            print(f"train.drop_last: true for {processes.world_size} processes (each needs an equal share of every "
                  "global batch; the last len(data) mod batch_size images of each epoch are skipped)")
    check_batch(t.batch_size, t.drop_last, processes)
    seed_everything(t.seed)
    data = load_data(config.data)
    n = len(data.dataset)
    steps_per_epoch = batches_per_epoch(n, t.batch_size, t.drop_last)
    if t.batch_size > n:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the data set ({n:,} "
                          f"{'points' if len(data.image_shape) == 1 else 'images'}); expected at most {n}")
    total_steps = t.steps if t.steps is not None else t.epochs * steps_per_epoch

    shape = data.image_shape
    check_memory(shape, m, t.batch_size)
    if t.channels_last and len(shape) != 3:
        raise ConfigError("train.channels_last: a memory layout for images; toy2d data are points")
    layout = torch.channels_last if t.channels_last else torch.contiguous_format
    bf16 = t.precision == "bf16"
    z_shape = latent_shape(shape, m.nz)
    netG = build_generator(shape, m).to(device, memory_format=layout)
    trained_G = wrap(netG, processes, device, bf16)  # what steps call: DDP and autocast when asked for

    def sample_latents(count: int) -> Tensor:
        # Every process draws the latents of the whole global batch (the RNG streams stay
        # identical) and keeps its own share: the same latents a single process would use.
        return local_share(torch.randn(count * processes.world_size, *z_shape, device=device), processes)

    def make_discriminator(sigmoid: bool = True) -> nn.Module:
        netD = build_discriminator(shape, m, sigmoid).to(device, memory_format=layout)
        return wrap(netD, processes, device, bf16)

    name = config.targets.name
    options = from_dict(options_class(name), config.targets.options, "targets.options")
    if name == STANDARD:
        strategy = StandardGAN(options, trained_G, make_discriminator(sigmoid=True), sample_latents, config.targets.d_steps)
    else:
        source_cls = registry.load("targets", name, "targets.name")
        context = TrainingContext(
            generator=trained_G,
            sample_latents=sample_latents,
            dataset=data.dataset,
            image_shape=shape,
            device=device,
            rank=processes.rank,
            world_size=processes.world_size,
            total_steps=total_steps,
            latent_shape=z_shape,
            seed=t.seed,
            make_discriminator=make_discriminator,
        )
        source = source_cls(options, context)
        if "ssim" in config.regression.loss and len(shape) != 3:
            raise ConfigError("regression.loss.ssim: SSIM needs images; toy2d data are points")
        engine = RegressionEngine(trained_G, config.regression, total_steps, processes.world_size)
        strategy = Decomposed(source, engine, sample_latents, config.targets.d_steps)
    config.targets.options = to_dict(options)  # the resolved config shows every option

    # Fixed noise for sample grids, from its own generator so that it draws
    # nothing from the training RNG.
    fixed_noise = torch.randn(64 if len(shape) == 3 else 1024, *z_shape, generator=torch.Generator().manual_seed(t.seed + 1))
    return Run(config, data, device, netG, strategy, fixed_noise.to(device), steps_per_epoch, total_steps,
               processes=processes)


@dataclass
class TrainedGenerator:
    """A run's generator from its checkpoint, built without its data or target source."""

    config: Config
    generator: nn.Module  # the trained network
    sampling_generator: nn.Module  # what samples come from: the EMA copy when the run kept one
    latent_shape: tuple[int, ...]
    image_shape: tuple[int, ...]
    device: torch.device
    step: int


def load_generator(run_dir: Path) -> TrainedGenerator:
    """The generator of ``run_dir``'s last checkpoint. Needs config.yaml and the checkpoint, never the
    training data: a run can be sampled after its images have moved."""
    config = config_of_run(run_dir)
    state = load_checkpoint(current_run_dir(resumable_run_dir(run_dir)) / CHECKPOINT, targets=config.targets.name)
    m = config.model
    shape = data_shape(config.data)
    device = resolve_device(config.train.device)
    check_memory(shape, m, 1)
    generator = build_generator(shape, m).to(device)
    sampling = generator
    try:
        generator.load_state_dict(state["generator"])
        if config.targets.name != STANDARD and config.regression.ema is not None:
            engine = RegressionEngine(generator, config.regression, total_steps=1)
            engine.load_state_dict(state["strategy"]["regression"])
            sampling = engine.sampling_generator()
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT} does not fit the generator of "
                              f"{run_dir / 'config.yaml'}: {first}") from None
    return TrainedGenerator(config, generator, sampling, latent_shape(shape, m.nz), shape, device, state["step"])


def load_trained(run_dir: Path) -> Run:
    """Rebuild a whole run (data, networks, target source) from its directory and load its latest checkpoint."""
    config = config_of_run(run_dir)
    run = build_run(config)
    run.step = restore(run, current_run_dir(run_dir) / CHECKPOINT, allow_config_change=True)[0].step
    return run
