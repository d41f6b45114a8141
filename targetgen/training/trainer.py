"""The training loop: ``train`` builds the run (``builder``), claims its directory (``rundir``),
restores a checkpoint when resuming, then runs step after step — the strategy's step
(``standard`` or ``decomposed``), the divergence guard, then the callbacks (``callbacks``:
progress, logging, evaluation, samples, checkpoints).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from .. import jsonsafe
from ..api import Batch
from ..config import Config, dump_config, to_dict
from ..data import epoch_order, iterate_batches
from ..distributed import Processes, anywhere, average, local_share, on_main
from ..errors import ConfigError, DivergenceError, TargetgenError, Terminated
from ..evaluation import check_evaluation
from ..progress import progress_bar
from .builder import build_run
from .callbacks import Callback, Evaluate, LogMetrics, SaveCheckpoints, ShowProgress, WriteSamples
from .checkpoint import load_checkpoint, restore
from .logs import check_loggers, open_loggers
from .run import Position, Run, StepEnd
from .rundir import (
    CHECKPOINT,
    METRICS,
    Replacement,
    check_no_links,
    prepare_run_dir,
    remove_orphans,
    resumable_run_dir,
    run_lock,
    settle_replacement,
)

# ----------------------------------------------------------------------------- training


def train(
    config: Config,
    run_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    processes: Processes = Processes(),
    allow_config_change: bool = False,
) -> Run:
    """Train ``config`` into ``run_dir`` (from its checkpoint when ``resume``).

    Everything is built, and so every value checked, before the directory is
    touched; then the directory is locked for the whole run. With ``overwrite``
    the previous run is moved aside and deleted only once the new run has
    written its first checkpoint; any failure before that puts it back
    (``rundir.Replacement``). A resumed run's config must equal its
    checkpoint's, but for the keys meant to change on resume, unless
    ``allow_config_change`` (the changes are then recorded in metrics.jsonl).
    Distributed, every process trains on its share of each global batch and
    resumes from the same checkpoint; rank 0 alone locks and writes anything.
    """
    if config.evaluation.every:  # rank 0 evaluates; its verdict reaches every process before any step
        on_main(processes, lambda: check_evaluation(config.evaluation, config.data, config.train.best_metric))
    elif config.train.best_metric:
        raise ConfigError("train.best_metric: needs in-run evaluation; set evaluation.every (e.g. to checkpoint_every)")
    on_main(processes, lambda: check_loggers(config.train.loggers))
    run = build_run(config, processes)
    if processes.is_main:
        print(f"training on {run.runtime}", flush=True)
    with contextlib.ExitStack() as held:
        held.enter_context(_remembering_ctrl_c())  # from the first change to the run directory on
        replacement = on_main(processes, lambda: _claim(held, run_dir, resume, overwrite))
        pos, order, changes = Position(), epoch_order(len(run.data.dataset), config.train.seed, 0), {}
        if resume:
            pos, order, changes = restore(run, run_dir / CHECKPOINT, allow_config_change)
        callbacks: list[Callback] = []
        if processes.is_main:
            dump_config(run.config, run_dir / "config.yaml")
            callbacks = held.enter_context(_callbacks(run, run_dir, pos.step, replacement, changes, progress))
        _loop(run, run_dir, pos, order, callbacks)
    return run


def _claim(held: contextlib.ExitStack, run_dir: Path, resume: bool, overwrite: bool) -> Replacement | None:
    """Lock ``run_dir`` for the run (held until ``held`` closes), settle what an earlier process left, and
    make it ready: resumable, or emptied for a new run with the previous one moved aside."""
    held.enter_context(run_lock(run_dir))
    settle_replacement(run_dir)  # an earlier --overwrite that was killed half-way
    check_no_links(run_dir)
    remove_orphans(run_dir)
    if resume:
        resumable_run_dir(run_dir)
        return None
    replacement = prepare_run_dir(run_dir, overwrite)
    if replacement is not None:
        held.enter_context(_replacing(replacement))
    return replacement


@contextlib.contextmanager
def _replacing(replacement: Replacement):
    """The previous run is deleted once the new one has checkpointed (or finished); put back on any failure before."""
    try:
        yield
    except BaseException as err:
        if not replacement.done:
            replacement.rollback()
            if isinstance(err, TargetgenError):
                err.args = (f"{err}; the previous run in {replacement.run_dir} was put back as it was",)
        raise
    replacement.commit()


@contextlib.contextmanager
def _callbacks(
    run: Run, run_dir: Path, start_step: int, replacement: Replacement | None, changes: dict, progress: bool
):
    """The callbacks of a run, in the order they run after each step; closes the loggers and the bar."""
    t = run.config.train
    loggers = open_loggers(t.loggers, run_dir, to_dict(run.config), start_step)
    bar = progress_bar("steps", extra="losses", disable=not progress)
    try:
        for logger in loggers:
            if hasattr(logger, "log_text"):
                logger.log_text("config", yaml.safe_dump(to_dict(run.config), sort_keys=False))
        if changes:  # --allow-config-change: what changed is part of the run's record
            with (run_dir / METRICS).open("a") as log:
                log.write(jsonsafe.dumps({"step": start_step, "config_change": changes}) + "\n")
        evaluation = Evaluate(run.config.evaluation.every, loggers) if run.config.evaluation.every else None
        checkpoints = SaveCheckpoints(
            run_dir, t.checkpoint_every, t.keep_checkpoints, t.best_metric, evaluation, replacement=replacement
        )
        with bar:
            task = bar.add_task(t.name, total=run.total_steps, completed=start_step, losses="")
            yield [
                ShowProgress(bar, task),
                LogMetrics(loggers),
                *([evaluation] if evaluation else []),
                WriteSamples(run_dir, t.sample_every, loggers),
                checkpoints,
            ]
    finally:
        for logger in loggers:
            logger.close()


# ----------------------------------------------------------------------------- the loop


@dataclass
class TimeBudget:
    """``train.max_seconds``: the run stops at the first step boundary past it, in every process at once."""

    limit: float | None
    processes: Processes

    def spent(self, seconds: float) -> bool:
        """Whether ``seconds`` of training used the budget up in any process (every process must ask together)."""
        return self.limit is not None and anywhere(seconds >= self.limit, self.processes)


@dataclass
class Throughput:
    """Images per second of training steps since the last logging step."""

    images: int = 0
    seconds: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.images, self.seconds = self.images + images, self.seconds + seconds

    def take(self) -> float:
        rate = self.images / max(self.seconds, 1e-9)
        self.images, self.seconds = 0, 0.0
        return rate


def _loop(run: Run, run_dir: Path, pos: Position, order: Tensor, callbacks: list[Callback]) -> None:
    t = run.config.train
    budget, meter = TimeBudget(t.max_seconds, run.processes), Throughput()
    out_of_time = budget.spent(pos.seconds)  # a resumed run may have none left
    while pos.step < run.total_steps and not out_of_time:
        started = time.perf_counter()  # an epoch's set-up (IMLE's re-match) counts as the first step's time
        run.data.start_epoch(pos.epoch)  # toy2d data.resample: this epoch's points, also on resume
        if pos.batch == 0:
            order = epoch_order(len(run.data.dataset), t.seed, pos.epoch)
            run.strategy.on_epoch_start(pos.epoch)
        batches = iterate_batches(
            run.data.dataset,
            order,
            t.batch_size,
            pos.batch,
            t.drop_last,
            run.config.data.num_workers,
            share=lambda b: local_share(b, run.processes),
        )
        for batch in batches:
            end = _step(run, run_dir, batch, pos, order, started, budget, meter)
            for callback in callbacks:
                callback.on_step_end(end)
            out_of_time = end.last and pos.step < run.total_steps
            if end.last or pos.batch == 0:
                break
            started = time.perf_counter()
    run.step = pos.step
    for callback in callbacks:
        callback.on_train_end(run, pos)


def _step(
    run: Run,
    run_dir: Path,
    batch: Batch,
    pos: Position,
    order: Tensor,
    started: float,
    budget: TimeBudget,
    meter: Throughput,
) -> StepEnd:
    """One training step, checked for divergence, with ``pos`` moved past it."""
    if _ctrl_c.is_set():  # a Ctrl-C or SIGTERM whose exception was swallowed (below)
        raise _stopped_by[0]
    t = run.config.train
    log = (pos.step + 1) % t.log_every == 0 or pos.step + 1 == run.total_steps
    log = log or (run.source is not None and run.source.must_log(pos.step))
    save = (pos.step + 1) % t.checkpoint_every == 0 or pos.step + 1 == run.total_steps
    try:
        stats = run.strategy.step(batch, pos.step, log)
    except DivergenceError as err:  # a network output the step could not go on with
        raise _diverged(run_dir, pos.step + 1, str(err)) from None
    values = _check_step(run, stats, pos.step + 1, run_dir, full=log or save)
    elapsed = time.perf_counter() - started
    images = len(batch.images) * run.processes.world_size  # the global batch
    pos.step, pos.batch, pos.images, pos.seconds = (
        pos.step + 1,
        pos.batch + 1,
        pos.images + images,
        pos.seconds + elapsed,
    )
    meter.add(images, elapsed)
    if pos.batch == run.steps_per_epoch:  # normalise: a finished epoch is the next one's start
        pos.epoch, pos.batch = pos.epoch + 1, 0
    # train.max_seconds: this step is the last one when it crossed the limit (in any process: all stop)
    out_of_time = budget.spent(pos.seconds)
    if out_of_time and not log:  # an unplanned last step: checked and logged like a planned one
        if not save and (bad := _non_finite_state(run)) is not None:  # (a checkpoint step was checked)
            raise _diverged(run_dir, pos.step, f"{bad} is not finite")
        log = True
    logged = average(dict(zip(stats, values.tolist())), run.processes) if log else None  # every process averages
    rate = meter.take() if log else 0.0
    return StepEnd(run, pos, order, logged, rate, pos.step == run.total_steps or out_of_time)


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM


_ctrl_c = threading.Event()
_stopped_by: list = [KeyboardInterrupt]  # which signal the remembered stop came from


@contextlib.contextmanager
def _remembering_ctrl_c():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt as Python's own handler does, and SIGTERM raises
    ``Terminated`` (a KeyboardInterrupt: the same checkpoint-kept stop, exit status 143). Both are also
    remembered, so that the loop stops at its next step even when the exception was raised inside a
    finaliser (a ``__del__`` or weakref callback run by the garbage collector), where Python prints
    "Exception ignored" and trains on. A handler someone else installed (or an ignored signal) stays."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    ours = {
        signal.SIGINT: (signal.default_int_handler, KeyboardInterrupt),
        signal.SIGTERM: (signal.SIG_DFL, Terminated),
    }
    previous = {}

    def interrupt(signum, frame):
        _ctrl_c.set()
        _stopped_by[0] = ours[signum][1]
        raise ours[signum][1]

    _ctrl_c.clear()
    for signum, (default, _) in ours.items():
        current = signal.getsignal(signum)
        if current == default:
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- divergence


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
    kept = (
        f"the last checkpoint ({path}, step {load_checkpoint(path)['step']}) is finite and kept"
        if path.is_file()
        else "no checkpoint was written yet"
    )
    return DivergenceError(f"training diverged at step {step}: {what}; {kept}")


def _check_step(run: Run, stats: dict[str, Tensor | float], step: int, run_dir: Path, full: bool) -> Tensor:
    """Stop at the first NaN or infinity: in a statistic of the step, in the generator's weights after
    it, and (``full``: before every checkpoint and on logging steps) anywhere in the state.

    Returns the statistics as one float64 tensor on the device: a single synchronisation per
    step checks them all (no ``.item()`` per statistic)."""
    values = (
        torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=run.device).detach().reshape(()) for v in stats.values()]
        )
        if stats
        else torch.zeros(0, dtype=torch.float64)
    )
    if not bool(values.isfinite().all()):
        key, value = next((k, v) for k, v in zip(stats, values.tolist()) if not math.isfinite(v))
        raise _diverged(run_dir, step, f"{key} = {value}")
    if not _finite(run.generator.parameters()):
        raise _diverged(run_dir, step, f"the generator's weights are not finite ({_non_finite_state(run)})")
    if full and (bad := _non_finite_state(run)) is not None:
        raise _diverged(run_dir, step, f"{bad} is not finite")
    return values
