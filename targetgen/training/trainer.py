"""The training loop: data, schedule, logging, samples and checkpoints — nothing else.

What happens inside one step belongs to the strategy: ``StandardGAN`` (the
tutorial's end-to-end step) or ``Decomposed`` (a target source, then the
regression engine).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import registry
from ..api import TargetGenerator, TrainingContext
from ..config import Config, dump_config, from_dict, to_dict, read_yaml
from ..data import TrainingData, batches_per_epoch, epoch_order, iterate_batches, load_data
from ..distributed import Processes, average, check_batch, local_share, on_main, wrap
from ..errors import ConfigError, DivergenceError, RunDirectoryError
from ..models import build_discriminator, build_generator, latent_shape
from ..regression import RegressionEngine
from ..samples import generate, save_samples
from .checkpoint import atomic_save, load_checkpoint, rng_state, seed_everything, set_rng_state
from .decomposed import Decomposed
from .standard import StandardGAN, StandardOptions

CHECKPOINT = "checkpoints/last.pt"


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
    check_batch(t.batch_size, t.drop_last, processes)
    seed_everything(t.seed)
    data = load_data(config.data)
    n = len(data.dataset)
    steps_per_epoch = batches_per_epoch(n, t.batch_size, t.drop_last)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: {t.batch_size} is larger than the data set ({n}) with drop_last")
    total_steps = t.steps if t.steps is not None else t.epochs * steps_per_epoch

    shape = data.image_shape
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
    if name == "standard":
        options = from_dict(StandardOptions, config.targets.options, "targets.options")
        strategy = StandardGAN(options, trained_G, make_discriminator(sigmoid=True), sample_latents)
    else:
        source_cls = registry.load("targets", name)
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
        strategy = Decomposed(source, RegressionEngine(trained_G, config.regression, total_steps, processes.world_size))
    config.targets.options = to_dict(options)  # the resolved config shows every option

    # Fixed noise for sample grids, from its own generator so that it draws
    # nothing from the training RNG.
    fixed_noise = torch.randn(64 if len(shape) == 3 else 1024, *z_shape, generator=torch.Generator().manual_seed(t.seed + 1))
    return Run(config, data, device, netG, strategy, fixed_noise.to(device), steps_per_epoch, total_steps,
               processes=processes)


# ----------------------------------------------------------------------------- run directories


def new_run_dir(config: Config, overwrite: bool) -> Path:
    run_dir = Path(config.train.out_dir) / config.train.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirectoryError(
                f"run directory {run_dir} exists; continue it with --resume {run_dir}, "
                "replace it with --overwrite, or choose another --name"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def config_of_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config saved in ``run_dir``, with (only) length overrides applied."""
    from ..config import apply_override

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} is not a targetgen run directory (no config.yaml)")
    raw = read_yaml(path)
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key not in ("train.steps", "train.epochs"):
            raise ConfigError(
                f"--set {key}: a resumed run keeps its config; only train.steps and train.epochs may change"
            )
        apply_override(raw, assignment)
    return from_dict(Config, raw)


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
            "format": 1,
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
    state = load_checkpoint(run_dir / CHECKPOINT)
    run.generator.load_state_dict(state["generator"])
    run.strategy.load_state_dict(state["strategy"])
    set_rng_state(state["rng"])
    position = Position(state["step"], state["epoch"], state["batch"], state.get("images", 0), state.get("seconds", 0.0))
    return position, state["order"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _check_finite(stats: dict[str, float], step: int, run_dir: Path) -> None:
    for key, value in stats.items():
        if not math.isfinite(value):
            ckpt = run_dir / CHECKPOINT
            kept = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
            raise DivergenceError(f"training diverged at step {step + 1}: {key} = {value}; {kept}")


def _check_evaluation(config: Config) -> None:
    """Fail before training, not at the first evaluation, on bad metrics or missing FID weights."""
    from ..evaluation import resolve_features, resolve_metrics
    from ..features import find_fid_weights

    features = resolve_features(config.evaluation, config.data)
    resolve_metrics(config.evaluation, config.data, features)
    if features == "inception":
        find_fid_weights(config.evaluation.fid_weights)


def _log_evaluation(run: Run, pos: Position, metrics) -> None:
    """Evaluation results as their own metrics.jsonl line, keys prefixed with ``eval/``.

    Evaluation draws its latents and real subset from seeded generators of its
    own, so it leaves the training trajectory (and exact resume) untouched.
    """
    from ..evaluation import evaluate

    results = evaluate(run)
    record = {"step": pos.step, "epoch": pos.epoch, "images_seen": pos.images, "train_s": pos.seconds}
    metrics.write(json.dumps({**record, **{f"eval/{k}": v for k, v in results.items()}}) + "\n")
    metrics.flush()


def write_samples(run: Run, path: Path) -> None:
    samples = generate(run.strategy.sampling_generator(), run.fixed_noise)
    data = run.data.dataset.images if len(run.data.image_shape) == 1 else None
    save_samples(samples, path, data, title=path.stem)


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          processes: Processes = Processes()) -> Run:
    """Train ``config`` into ``run_dir`` (from its checkpoint when ``resume``).

    Distributed, every process trains on its share of each global batch and
    resumes from the same checkpoint; rank 0 alone writes anything.
    """
    if config.evaluation.every:  # rank 0 evaluates; its verdict reaches every process before any step
        on_main(processes, lambda: _check_evaluation(config))
    run = build_run(config, processes)
    t = config.train
    main = processes.is_main
    metrics_path = run_dir / "metrics.jsonl"
    pos = Position()
    order = epoch_order(len(run.data.dataset), t.seed, 0)
    if resume and (run_dir / CHECKPOINT).exists():
        pos, order = _restore(run, run_dir)
        if main:
            _truncate_metrics(metrics_path, pos.step)
    elif main:
        metrics_path.unlink(missing_ok=True)
    if main:
        dump_config(config, run_dir / "config.yaml")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
        disable=not (progress and main),
    )
    task = bar.add_task(config.train.name, total=run.total_steps, completed=pos.step, losses="")
    images_seen, busy = 0, 0.0
    with bar, (metrics_path.open("a") if main else contextlib.nullcontext()) as metrics:
        while pos.step < run.total_steps:
            started = time.perf_counter()  # an epoch's set-up (IMLE's re-match) counts as training time
            run.data.start_epoch(pos.epoch)  # toy2d data.resample: this epoch's points, also on resume
            if pos.batch == 0:
                order = epoch_order(len(run.data.dataset), t.seed, pos.epoch)
                run.strategy.on_epoch_start(pos.epoch)
            batches = iterate_batches(run.data.dataset, order, t.batch_size, pos.batch, t.drop_last,
                                      config.data.num_workers, share=lambda b: local_share(b, processes))
            for batch in batches:
                log = (pos.step + 1) % t.log_every == 0 or pos.step + 1 == run.total_steps
                stats = run.strategy.step(batch, pos.step, log)
                _check_finite(stats, pos.step, run_dir)
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
                    metrics.write(json.dumps(record) + "\n")
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
                    if pos.step % t.checkpoint_every == 0 or pos.step == run.total_steps:
                        _save_checkpoint(run, run_dir, pos, order)
                if pos.step >= run.total_steps or pos.batch == 0:
                    break
                started = time.perf_counter()
    if main:
        write_samples(run, run_dir / "samples" / "final.png")
    return run


def load_trained(run_dir: Path) -> Run:
    """Rebuild a run from its directory and load its latest checkpoint."""
    config = config_of_run(run_dir)
    run = build_run(config)
    run.step = _restore(run, run_dir)[0].step
    return run
