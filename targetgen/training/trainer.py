"""The training loop, and the decomposed step it runs, phase by phase.

``train`` builds the run (``builder``), claims its directory (``rundir``),
restores a checkpoint when resuming, then loops: each step runs the strategy —
the standard GAN's end-to-end step (``standard``) or the decomposed step below —
stops on a NaN or infinity, and hands over to the callbacks (``callbacks``:
logging, evaluation, samples, checkpoints).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .. import jsonsafe
from ..api import Batch, Generated, TargetGenerator
from ..config import Config, dump_config, to_dict
from ..data import epoch_order, iterate_batches
from ..distributed import Processes, anywhere, average, local_share, on_main
from ..errors import ConfigError, DivergenceError, TargetgenError, Terminated, raise_terminated
from ..progress import progress_bar
from ..regression import RegressionEngine
from .checkpoint import Position, load_checkpoint, restore
from .rundir import (CHECKPOINT, METRICS, Replacement, check_no_links, prepare_run_dir, remove_orphans, resumable_run_dir,
                     run_lock, settle_replacement)

if TYPE_CHECKING:
    from .builder import Run


# ----------------------------------------------------------------------------- the decomposed step


class Decomposed:
    def __init__(self, source: TargetGenerator, regression: RegressionEngine,
                 sample_latents: Callable[[int], Tensor], d_steps: int = 1):
        if d_steps > 1 and not source.trains_in_update():
            raise ConfigError(f"targets.d_steps: {d_steps} needs a source with an update phase; "
                              f"'{source.name}' trains nothing of its own there (use 1)")
        self.source = source
        self.regression = regression
        self.sample_latents = sample_latents
        self.d_steps = d_steps

    def on_epoch_start(self, epoch: int) -> None:
        self.source.on_epoch_start(epoch)

    def step(self, batch: Batch, step: int, log: bool) -> dict[str, Tensor | float]:
        """One generator step in three phases; statistics stay tensors (the loop reads them once)."""
        stats: dict[str, Tensor | float] = {}
        # 1. update: the source trains what it owns (inversion: its discriminator), on fresh samples each time
        for _ in range(self.d_steps):
            batch = replace(batch, generated=Generated(self.regression.generator, self.sample_latents, len(batch.images)))
            stats.update(self.source.update(batch, step))
        # 2. propose: targets for the last update's samples (inversion: inverse examples)
        targets = self.source.propose(batch, step)
        stats.update(targets.stats)
        # 3. regress: fit the generator onto the targets
        stats.update(self.regression.fit(targets, step, measure_reach=log))
        if log:
            stats.update(self.source.diagnostics(targets))
        return stats

    def sampling_generator(self) -> nn.Module:
        return self.regression.sampling_generator()

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "regression": self.regression.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.regression.load_state_dict(state["regression"])


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
    kept = (f"the last checkpoint ({path}, step {load_checkpoint(path)['step']}) is finite and kept"
            if path.is_file() else "no checkpoint was written yet")
    return DivergenceError(f"training diverged at step {step}: {what}; {kept}")


def _check_step(run: Run, stats: dict[str, Tensor | float], step: int, run_dir: Path, full: bool) -> Tensor:
    """Stop at the first NaN or infinity: in a statistic of the step, in the generator's weights after
    it, and (``full``: before every checkpoint and on logging steps) anywhere in the state.

    Returns the statistics as one float64 tensor on the device: a single synchronisation per
    step checks them all (no ``.item()`` per statistic)."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=run.device).detach().reshape(())
                          for v in stats.values()]) if stats else torch.zeros(0, dtype=torch.float64)
    if not bool(values.isfinite().all()):
        key, value = next((k, v) for k, v in zip(stats, values.tolist()) if not math.isfinite(v))
        raise _diverged(run_dir, step, f"{key} = {value}")
    if not _finite(run.generator.parameters()):
        raise _diverged(run_dir, step, f"the generator's weights are not finite ({_non_finite_state(run)})")
    if full and (bad := _non_finite_state(run)) is not None:
        raise _diverged(run_dir, step, f"{bad} is not finite")
    return values



# ----------------------------------------------------------------------------- training


def train(config: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
          processes: Processes = Processes(), allow_config_change: bool = False) -> Run:
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
    from ..evaluation import check_evaluation
    from .builder import build_run  # the builder constructs this module's Decomposed
    from .logs import check_loggers

    if config.evaluation.every:  # rank 0 evaluates; its verdict reaches every process before any step
        on_main(processes, lambda: check_evaluation(config.evaluation, config.data, config.train.best_metric))
    elif config.train.best_metric:
        raise ConfigError("train.best_metric: needs in-run evaluation; set evaluation.every (e.g. to checkpoint_every)")
    on_main(processes, lambda: check_loggers(config.train.loggers))
    run = build_run(config, processes)
    with contextlib.ExitStack() as held:
        replacement: list = [None]

        def claim() -> None:
            held.enter_context(run_lock(run_dir))
            settle_replacement(run_dir)  # an earlier --overwrite that was killed half-way
            check_no_links(run_dir)
            remove_orphans(run_dir)
            if resume:
                resumable_run_dir(run_dir)
            else:
                replacement[0] = prepare_run_dir(run_dir, overwrite)
                if replacement[0] is not None:
                    held.enter_context(_replacing(replacement[0]))

        on_main(processes, claim)
        pos, order, changes = Position(), epoch_order(len(run.data.dataset), config.train.seed, 0), {}
        if resume:
            pos, order, changes = restore(run, run_dir / CHECKPOINT, allow_config_change)
        callbacks: list = []
        if processes.is_main:
            dump_config(config, run_dir / "config.yaml")
            callbacks = held.enter_context(_callbacks(run, run_dir, pos.step, replacement[0], changes))
        held.enter_context(_remembering_ctrl_c())
        _loop(run, run_dir, pos, order, callbacks, progress)
    return run


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


_ctrl_c = threading.Event()


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
    ours = {signal.SIGINT: (signal.default_int_handler, KeyboardInterrupt), signal.SIGTERM: (raise_terminated, Terminated)}
    previous = {}

    def interrupt(signum, frame):
        _ctrl_c.set()
        _stopped_by[0] = ours[signum][1]
        raise ours[signum][1]

    _ctrl_c.clear()
    for signum, (default, _) in ours.items():
        current = signal.getsignal(signum)
        if current is default or (signum == signal.SIGTERM and current == signal.SIG_DFL):
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_stopped_by: list = [KeyboardInterrupt]  # which signal the remembered stop came from


@contextlib.contextmanager
def _callbacks(run: Run, run_dir: Path, start_step: int, replacement: Replacement | None, changes: dict):
    """The callbacks of a run, in the order they run after each step; closes the loggers."""
    from .callbacks import Evaluate, LogMetrics, SaveCheckpoints, WriteSamples
    from .logs import open_loggers

    t = run.config.train
    loggers = open_loggers(t.loggers, run_dir, to_dict(run.config), start_step)
    try:
        if changes:  # --allow-config-change: what changed is part of the run's record
            (run_dir / METRICS).open("a").write(jsonsafe.dumps({"step": start_step, "config_change": changes}) + "\n")
        evaluation = Evaluate(run.config.evaluation.every, loggers) if run.config.evaluation.every else None
        checkpoints = SaveCheckpoints(run_dir, t.checkpoint_every, t.keep_checkpoints, t.best_metric, evaluation,
                                      replacement=replacement)
        yield [LogMetrics(loggers), *([evaluation] if evaluation else []), WriteSamples(run_dir, t.sample_every), checkpoints]
    finally:
        for logger in loggers:
            logger.close()


def _loop(run: Run, run_dir: Path, pos: Position, order: Tensor, callbacks: list, progress: bool) -> None:
    from .callbacks import SaveCheckpoints, StepEnd

    config, processes = run.config, run.processes
    t = config.train
    saving = next((c for c in callbacks if isinstance(c, SaveCheckpoints)), None)
    bar = progress_bar("steps", extra="losses", disable=not (progress and processes.is_main))
    task = bar.add_task(config.train.name, total=run.total_steps, completed=pos.step, losses="")
    images_seen, busy = 0, 0.0
    out_of_time = t.max_seconds is not None and pos.seconds >= t.max_seconds  # a resumed run may have none left
    with bar:
        while pos.step < run.total_steps and not out_of_time:
            started = time.perf_counter()  # an epoch's set-up (IMLE's re-match) counts as training time
            run.data.start_epoch(pos.epoch)  # toy2d data.resample: this epoch's points, also on resume
            if pos.batch == 0:
                order = epoch_order(len(run.data.dataset), t.seed, pos.epoch)
                run.strategy.on_epoch_start(pos.epoch)
            if saving is not None:
                saving.order = order
            batches = iterate_batches(run.data.dataset, order, t.batch_size, pos.batch, t.drop_last,
                                      config.data.num_workers, share=lambda b: local_share(b, processes))
            for batch in batches:
                if _ctrl_c.is_set():  # a Ctrl-C or SIGTERM whose exception was swallowed (above)
                    raise _stopped_by[0]
                log = (pos.step + 1) % t.log_every == 0 or pos.step + 1 == run.total_steps
                save = (pos.step + 1) % t.checkpoint_every == 0 or pos.step + 1 == run.total_steps
                try:
                    stats = run.strategy.step(batch, pos.step, log)
                except DivergenceError as err:  # a network output the step could not go on with
                    raise _diverged(run_dir, pos.step + 1, str(err)) from None
                values = _check_step(run, stats, pos.step + 1, run_dir, full=log or save)
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
                # train.max_seconds: this step is the last one when it crossed the limit (in any process: all stop)
                out_of_time = t.max_seconds is not None and anywhere(pos.seconds >= t.max_seconds, processes)
                if out_of_time and not log:  # an unplanned last step: checked and logged like a planned one
                    if not save and (bad := _non_finite_state(run)) is not None:  # (a checkpoint step was checked)
                        raise _diverged(run_dir, pos.step, f"{bad} is not finite")
                    log = True
                logged = None
                if log:  # every process takes part in the average, rank 0 writes
                    logged = average(dict(zip(stats, values.tolist())), processes)
                    shown = ("d_loss", "g_loss", "regression_loss", "target_reach")
                    bar.update(task, losses=" ".join(f"{k}={logged[k]:.3g}" for k in shown if k in logged))
                end = StepEnd(run, pos, logged, images_seen / max(busy, 1e-9), pos.step == run.total_steps or out_of_time)
                for callback in callbacks:
                    callback.on_step_end(end)
                if log:
                    images_seen, busy = 0, 0.0
                bar.update(task, completed=pos.step)
                if pos.step >= run.total_steps or pos.batch == 0 or out_of_time:
                    break
                started = time.perf_counter()
    run.step = pos.step
    for callback in callbacks:
        callback.on_train_end(run, pos)
