"""The training loop: data, schedule, logging, samples and checkpoints — nothing else.

What happens inside one step belongs to the strategy: ``StandardGAN`` (the
tutorial's end-to-end step) or ``Decomposed`` (a target source, then the
regression engine).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import __version__, jsonsafe, registry
from ..api import TargetGenerator, TrainingContext
from ..config import Config, DataConfig, dump_config, from_dict, to_dict
from ..data import TrainingData, batches_per_epoch, data_shape, epoch_order, iterate_batches, load_data
from ..distributed import Processes, average, check_batch, local_share, on_main, wrap
from ..errors import CheckpointError, ConfigError, DivergenceError
from ..models import build_discriminator, build_generator, latent_shape
from ..regression import RegressionEngine
from ..samples import generate, save_samples
from .checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, seed_everything, set_rng_state
from .decomposed import Decomposed
from .rundir import (
    CHECKPOINT, METRICS, config_of_run, planned_run_dir, prepare_run_dir, remove_orphans, resumable_run_dir, run_lock,
    truncate_metrics,
)
from .standard import StandardGAN, StandardOptions


def resolve_device(name: str, processes: Processes = Processes()) -> torch.device:
    """The configured device; a distributed process on CUDA gets the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and processes.distributed and torch.cuda.is_available():
        torch.cuda.set_device(processes.local_rank)
        return torch.device("cuda", processes.local_rank)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but no CUDA device is available; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None


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


def build_run(config: Config, processes: Processes = Processes()) -> Run:
    """Build data, models and strategy. Resolves the target options in ``config`` in place."""
    t, m = config.train, config.model
    device = resolve_device(t.device, processes)
    _check_gpu_options(config, device)
    t.threads = t.threads or default_threads(config.data)
    torch.set_num_threads(t.threads)
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
    if t.channels_last and len(shape) != 3:
        raise ConfigError("train.channels_last: a memory layout for images; toy2d data are points")
    layout = torch.channels_last if t.channels_last else torch.contiguous_format
    bf16 = t.precision == "bf16"
    z_shape = latent_shape(shape, m.nz)
    netG = build_generator(shape, m.nz, m.ngf, m.hidden).to(device, memory_format=layout)
    trained_G = wrap(netG, processes, device, bf16)  # what steps call: DDP and autocast when asked for

    def sample_latents(count: int) -> Tensor:
        # Every process draws the latents of the whole global batch (the RNG streams stay
        # identical) and keeps its own share: the same latents a single process would use.
        return local_share(torch.randn(count * processes.world_size, *z_shape, device=device), processes)

    def make_discriminator(sigmoid: bool = True) -> nn.Module:
        netD = build_discriminator(shape, m.ndf, m.hidden, sigmoid).to(device, memory_format=layout)
        return wrap(netD, processes, device, bf16)

    name = config.targets.name
    if name == "standard":
        options = from_dict(StandardOptions, config.targets.options, "targets.options")
        strategy = StandardGAN(options, trained_G, make_discriminator(sigmoid=True), sample_latents, config.targets.d_steps)
    else:
        source_cls = registry.load("targets", name, "targets.name")
        options = from_dict(source_cls.Options, config.targets.options, "targets.options")
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


def plan_run_dir(config: Config, overwrite: bool = False) -> Path:
    """Where ``config``'s run goes, refused when that would lose work; nothing is created or deleted yet."""
    return planned_run_dir(config.train.out_dir, config.train.name, overwrite)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` done
    images: int = 0  # real images seen, for equal-budget comparisons
    seconds: float = 0.0  # time spent in training steps (not evaluation or I/O), summed over resumes


def _save_checkpoint(run: Run, run_dir: Path, pos: Position, order: Tensor) -> None:
    atomic_save(
        {
            "format": FORMAT,
            "targets": run.config.targets.name,
            "version": __version__,
            "config": to_dict(run.config),
            "step": pos.step,
            "epoch": pos.epoch,
            "batch": pos.batch,
            "images": pos.images,
            "seconds": pos.seconds,
            "order": order,
            "generator": run.generator.state_dict(),
            "strategy": run.strategy.state_dict(),
            "rng": rng_state(),
        },
        run_dir / CHECKPOINT,
    )


def _restore(run: Run, run_dir: Path) -> tuple[Position, Tensor]:
    """Load the run's checkpoint into ``run``: refused in one line when it does not fit."""
    path = run_dir / CHECKPOINT
    state = load_checkpoint(path, targets=run.config.targets.name)
    t = run.config.train
    if state["step"] > run.total_steps:
        key, value = ("train.steps", t.steps) if t.steps is not None else ("train.epochs", t.epochs)
        raise ConfigError(f"{key}: {value} gives {run.total_steps} steps, fewer than the checkpoint's "
                          f"{state['step']}; a resumed run can only be extended")
    try:
        run.generator.load_state_dict(state["generator"])
        run.strategy.load_state_dict(state["strategy"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this run's networks or optimisers: {first}") from None
    set_rng_state(state["rng"])
    position = Position(state["step"], state["epoch"], state["batch"], state.get("images", 0), state.get("seconds", 0.0))
    return position, state["order"]


def _floating_tensors(state: dict):
    for value in state.values():
        if isinstance(value, dict):
            yield from _floating_tensors(value)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            yield value


def _finite(tensors) -> bool:
    """No NaN or infinity in ``tensors``: one fused max-abs over all of them."""
    tensors = list(tensors)
    return not tensors or bool(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf).isfinite())


def _non_finite_state(run: Run) -> str | None:
    """The first network, optimiser or buffer entry holding a NaN or infinity, by name."""
    for owner, state in (("generator", run.generator.state_dict()), ("strategy", run.strategy.state_dict())):
        if _finite(_floating_tensors(state)):
            continue
        flat = [(owner, state)]
        while flat:
            prefix, node = flat.pop(0)
            for key, value in node.items():
                if isinstance(value, dict):
                    flat.append((f"{prefix}.{key}", value))
                elif isinstance(value, torch.Tensor) and value.is_floating_point() and not _finite([value]):
                    return f"{prefix}.{key}"
    return None


def _diverged(run_dir: Path, step: int, what: str) -> DivergenceError:
    path = run_dir / CHECKPOINT
    kept = (f"the last checkpoint ({path}, step {load_checkpoint(path)['step']}) is finite and kept"
            if path.is_file() else "no checkpoint was written yet")
    return DivergenceError(f"training diverged at step {step}: {what}; {kept}")


def _check_step(run: Run, stats: dict[str, float], step: int, run_dir: Path, full: bool) -> None:
    """Stop at the first NaN or infinity: in a logged statistic, in the generator's weights after
    the step, and (``full``: before every checkpoint and on logging steps) anywhere in the state."""
    for key, value in stats.items():
        if not math.isfinite(value):
            raise _diverged(run_dir, step, f"{key} = {value}")
    if not _finite(run.generator.parameters()):
        raise _diverged(run_dir, step, f"the generator's weights are not finite ({_non_finite_state(run)})")
    if full and (bad := _non_finite_state(run)) is not None:
        raise _diverged(run_dir, step, f"{bad} is not finite")


def _log_evaluation(run: Run, pos: Position, metrics) -> None:
    """Evaluation results as their own metrics.jsonl line, keys prefixed with ``eval/``.

    Evaluation draws its latents and real subset from seeded generators of its
    own, so it leaves the training trajectory (and exact resume) untouched.
    """
    from ..evaluation import evaluate

    results = evaluate(run)
    record = {"step": pos.step, "epoch": pos.epoch, "images_seen": pos.images, "train_s": pos.seconds}
    metrics.write(jsonsafe.dumps({**record, **{f"eval/{k}": v for k, v in results.items()}}) + "\n")
    metrics.flush()


def write_samples(run: Run, path: Path) -> None:
    samples = generate(run.strategy.sampling_generator(), run.fixed_noise)
    data = run.data.dataset.images if len(run.data.image_shape) == 1 else None
    save_samples(samples, path, data, title=path.stem)


def train(config: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          processes: Processes = Processes()) -> Run:
    """Train ``config`` into ``run_dir`` (from its checkpoint when ``resume``).

    Everything is built, and so every value checked, before the directory is
    touched; then the directory is locked for the whole run, and emptied first
    only when ``overwrite`` allows it (``rundir.prepare_run_dir``).
    Distributed, every process trains on its share of each global batch and
    resumes from the same checkpoint; rank 0 alone locks and writes anything.
    """
    if config.evaluation.every:  # rank 0 evaluates; its verdict reaches every process before any step
        from ..evaluation import check_evaluation

        on_main(processes, lambda: check_evaluation(config.evaluation, config.data))
    run = build_run(config, processes)
    with contextlib.ExitStack() as held:

        def claim() -> None:
            held.enter_context(run_lock(run_dir))
            remove_orphans(run_dir)
            if resume:
                resumable_run_dir(run_dir)
            else:
                prepare_run_dir(run_dir, overwrite)

        on_main(processes, claim)
        pos, order = Position(), epoch_order(len(run.data.dataset), config.train.seed, 0)
        if resume:
            pos, order = _restore(run, run_dir)
        if processes.is_main:
            truncate_metrics(run_dir / METRICS, pos.step)  # a resumed run redoes what came after its checkpoint
            dump_config(config, run_dir / "config.yaml")
        _loop(run, run_dir, pos, order, progress)
    return run


def _loop(run: Run, run_dir: Path, pos: Position, order: Tensor, progress: bool) -> None:
    config, processes = run.config, run.processes
    t = config.train
    main = processes.is_main
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
        disable=not (progress and main),
    )
    task = bar.add_task(config.train.name, total=run.total_steps, completed=pos.step, losses="")
    images_seen, busy = 0, 0.0
    with bar, ((run_dir / METRICS).open("a") if main else contextlib.nullcontext()) as metrics:
        while pos.step < run.total_steps:
            started = time.perf_counter()  # an epoch's set-up (IMLE's re-match) counts as training time
            if pos.batch == 0:
                order = epoch_order(len(run.data.dataset), t.seed, pos.epoch)
                run.strategy.on_epoch_start(pos.epoch)
            batches = iterate_batches(run.data.dataset, order, t.batch_size, pos.batch, t.drop_last,
                                      config.data.num_workers, share=lambda b: local_share(b, processes))
            for batch in batches:
                log = (pos.step + 1) % t.log_every == 0 or pos.step + 1 == run.total_steps
                save = (pos.step + 1) % t.checkpoint_every == 0 or pos.step + 1 == run.total_steps
                try:
                    stats = run.strategy.step(batch, pos.step, log)
                except DivergenceError as err:  # a network output the step could not go on with
                    raise _diverged(run_dir, pos.step + 1, str(err)) from None
                _check_step(run, stats, pos.step + 1, run_dir, full=log or save)
                pos.step += 1
                pos.batch += 1
                elapsed = time.perf_counter() - started
                images = len(batch.images) * processes.world_size  # the global batch
                images_seen += images
                busy += elapsed
                pos.images += images
                pos.seconds += elapsed
                if pos.batch == run.steps_per_epoch:  # normalise: a finished epoch is the next one's start
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                if log:
                    stats = average(stats, processes)  # every process takes part, rank 0 writes
                if log and main:
                    record = {"step": pos.step, "epoch": pos.epoch, "images_seen": pos.images, "train_s": pos.seconds,
                              "images_per_s": images_seen / max(busy, 1e-9), **stats}
                    metrics.write(jsonsafe.dumps(record) + "\n")
                    metrics.flush()
                    shown = ("d_loss", "g_loss", "regression_loss", "target_reach")
                    bar.update(task, losses=" ".join(f"{k}={stats[k]:.3g}" for k in shown if k in stats))
                if log:
                    images_seen, busy = 0, 0.0
                bar.update(task, completed=pos.step)
                if main:
                    if config.evaluation.every and (pos.step % config.evaluation.every == 0 or pos.step == run.total_steps):
                        _log_evaluation(run, pos, metrics)
                    if pos.step % t.sample_every == 0:
                        write_samples(run, run_dir / "samples" / f"step_{pos.step:06d}.png")
                    if save:
                        _save_checkpoint(run, run_dir, pos, order)
                if pos.step >= run.total_steps or pos.batch == 0:
                    break
                started = time.perf_counter()
    if main:
        write_samples(run, run_dir / "samples" / "final.png")


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
    state = load_checkpoint(resumable_run_dir(run_dir) / CHECKPOINT, targets=config.targets.name)
    m = config.model
    shape = data_shape(config.data)
    device = resolve_device(config.train.device)
    generator = build_generator(shape, m.nz, m.ngf, m.hidden).to(device)
    sampling = generator
    try:
        generator.load_state_dict(state["generator"])
        if config.targets.name != "standard" and config.regression.ema is not None:
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
    run.step = _restore(run, run_dir)[0].step
    return run
