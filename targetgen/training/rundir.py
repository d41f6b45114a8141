"""Run directories: where a run lives, who may write it, what may be deleted, and its log.

A run directory ``<out_dir>/<name>/`` holds ``config.yaml``, ``checkpoints/``,
``metrics.jsonl``, ``samples/`` and, while a process trains it, ``.lock``.
The guarantees (docs/reliability.md):

* a run name is one path component, so a run directory always lies inside its out-dir;
* ``--overwrite`` deletes only a targetgen run directory (``config.yaml`` and
  ``checkpoints/``) inside the out-dir, and only once the config has been
  validated and the directory locked;
* one process at a time writes a run directory: the lock is an ``flock`` on
  ``.lock``, which the kernel releases when its process dies, however it dies,
  so a lock left by a killed run is never in the way;
* ``metrics.jsonl`` survives a kill in the middle of a line: a torn last line
  is ignored when read and dropped when the run resumes.
"""

from __future__ import annotations

import fcntl  # POSIX: targetgen's run directories are written on Linux and macOS
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import Config, apply_override, from_dict, read_yaml
from ..errors import ConfigError, RunDirectoryError
from ..files import atomic_write

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
CHECKPOINT = f"{CHECKPOINTS}/last.pt"
METRICS = "metrics.jsonl"
LOCK = ".lock"
REPLACED = ".replaced"  # an --overwrite's previous run, until the new run's first checkpoint
MAX_NAME_BYTES = 200
# What targetgen writes into a run directory: none of them may be a symbolic link (it would write elsewhere).
WRITTEN = (
    CONFIG,
    CHECKPOINTS,
    METRICS,
    LOCK,
    REPLACED,
    "samples",
    "tensorboard",
    "eval.json",
    "summary.json",
    "probe.json",
)


# ----------------------------------------------------------------------------- names and places


def check_run_name(name: str) -> str:
    """A run name is one path component: no separator, not '.' or '..', not absolute."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise ConfigError(
            f"train.name: expected one folder name (no '/', not '.' or '..', not an absolute path), got {name!r}; "
            "use --out-dir to choose where run directories go"
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(
            f"train.name: {len(name.encode())} bytes long; expected at most {MAX_NAME_BYTES} "
            f"(file systems allow 255, and targetgen adds suffixes), got {name[:40]!r}..."
        )
    return name


def is_run_directory(path: Path) -> bool:
    """A folder targetgen made: it holds config.yaml and checkpoints/."""
    return (path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir()


def _has_content(path: Path) -> bool:
    return any(entry.name not in (LOCK, REPLACED) for entry in path.iterdir())


def planned_run_dir(out_dir: str | Path, name: str, overwrite: bool) -> Path:
    """Where a new run goes, refusing anything that would lose work; deletes nothing.

    Checked again, under the lock, by ``prepare_run_dir`` just before training.
    """
    out = Path(out_dir)
    run_dir = out / check_run_name(name)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out-dir {out} is a file, not a folder; choose a folder for run directories")
    if run_dir.is_symlink():
        raise RunDirectoryError(
            f"run directory {run_dir} is a symbolic link (to {os.readlink(run_dir)}); "
            "targetgen never writes or deletes through one; choose another --name"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir} is a file, not a run directory; choose another --name")
    if run_dir.is_dir() and _has_content(run_dir):
        check_not_in_use(run_dir)
        if not overwrite:
            raise RunDirectoryError(
                f"run directory {run_dir} exists; continue it with --resume {run_dir}, "
                "replace it with --overwrite, or choose another --name"
            )
        if not is_run_directory(run_dir):
            raise RunDirectoryError(
                f"--overwrite: {run_dir} is not a targetgen run directory (no config.yaml and checkpoints/); "
                "nothing was deleted; choose another --name or remove it yourself"
            )
    return run_dir


def plan_run_dir(config, overwrite: bool = False) -> Path:
    """Where ``config``'s run goes (``planned_run_dir`` of its train section)."""
    return planned_run_dir(config.train.out_dir, config.train.name, overwrite)


def check_no_links(run_dir: Path) -> None:
    """Refuse a run directory where anything targetgen writes or deletes is a symbolic link: a link
    to elsewhere would let a checkpoint, a retention sweep or the lock write outside the run."""
    entries = [run_dir / name for name in WRITTEN]
    if (run_dir / CHECKPOINTS).is_dir() and not (run_dir / CHECKPOINTS).is_symlink():
        entries += sorted((run_dir / CHECKPOINTS).iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise RunDirectoryError(
                f"{entry} is a symbolic link (to {os.readlink(entry)}); targetgen never writes "
                "or deletes through one; replace it with the folder or file itself"
            )


class Replacement:
    """An ``--overwrite`` in progress: the previous run waits in ``RUN/.replaced`` until the new run has
    written its first checkpoint (``commit``: then it is deleted); any failure before that puts it back
    (``rollback``). Both happen under the run's lock; a process killed in between leaves ``.replaced``,
    which the next process to lock the run directory settles (``settle_replacement``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.aside = run_dir / REPLACED
        self.done = False

    @classmethod
    def begin(cls, run_dir: Path) -> Replacement:
        replacement = cls(run_dir)
        replacement.aside.mkdir()
        for entry in list(run_dir.iterdir()):
            if entry.name not in (LOCK, REPLACED):
                entry.rename(replacement.aside / entry.name)  # the same folder's file system: a rename, never a copy
        return replacement

    def commit(self) -> None:
        if not self.done:
            shutil.rmtree(self.aside)  # removes links found inside, never what they point to
            self.done = True

    def rollback(self) -> None:
        if self.done:
            return
        for entry in list(self.run_dir.iterdir()):
            if entry.name not in (LOCK, REPLACED):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in list(self.aside.iterdir()):
            entry.rename(self.run_dir / entry.name)
        self.aside.rmdir()
        self.done = True


def settle_replacement(run_dir: Path) -> None:
    """Finish an ``--overwrite`` whose process died: the new run is kept once it has a checkpoint,
    else the previous run is put back. Call under the lock."""
    if (run_dir / REPLACED).is_dir() and not (run_dir / REPLACED).is_symlink():
        replacement = Replacement(run_dir)
        replacement.commit() if (run_dir / CHECKPOINT).is_file() else replacement.rollback()


def current_run_dir(run_dir: Path) -> Path:
    """Where ``run_dir``'s run is now: in ``.replaced`` while an interrupted ``--overwrite`` that never
    reached its first checkpoint waits to be rolled back, else ``run_dir`` itself. For reading only."""
    aside = run_dir / REPLACED
    if aside.is_dir() and not aside.is_symlink() and not (run_dir / CHECKPOINT).is_file():
        return aside
    return run_dir


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Replacement | None:
    """Make ``run_dir`` ready for a new run; the caller holds its lock. An existing run (``overwrite``)
    is moved aside, not deleted: the returned ``Replacement`` deletes or restores it."""
    replacement = None
    if _has_content(run_dir):  # another process may have started a run here since it was planned
        planned_run_dir(run_dir.parent, run_dir.name, overwrite)
        replacement = Replacement.begin(run_dir)
    (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
    return replacement


def checkpoint_file(run_dir: Path, which: str = "last") -> Path:
    """The checkpoint ``which`` names: ``last``, ``best`` (kept with train.best_metric), ``step_N`` (kept with
    train.keep_checkpoints) or a path; one line listing what there is when it does not exist."""
    folder = current_run_dir(run_dir) / CHECKPOINTS
    if which == "last":
        path = folder / "last.pt"
    elif which == "best":
        path = folder / "best.pt"
    elif which.startswith("step_") and which[5:].isdigit():
        path = folder / f"step_{int(which[5:]):06d}.pt"
    else:
        path = Path(which)
        if not path.is_file():
            raise RunDirectoryError(f"--checkpoint: expected last, best, step_N or a checkpoint file, got {which!r}")
        return path
    if not path.is_file():
        kept = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
        raise RunDirectoryError(
            f"--checkpoint {which}: {run_dir} has no {path.relative_to(current_run_dir(run_dir))} "
            f"(kept: {', '.join(kept) or 'none'})"
        )
    return path


def resumable_run_dir(run_dir: Path) -> Path:
    """``run_dir`` if it is a run directory with a checkpoint to resume from."""
    current = current_run_dir(run_dir)
    if not (current / CONFIG).is_file():
        raise RunDirectoryError(f"{run_dir} is not a targetgen run directory (no {CONFIG})")
    check_not_in_use(run_dir)
    if not (current / CHECKPOINT).is_file():
        raise RunDirectoryError(
            f"--resume: {run_dir} has no checkpoint ({CHECKPOINT}): the run stopped before its first one; "
            f"start it again with --config {run_dir / CONFIG} --overwrite"
        )
    return run_dir


def _os_error(err: OSError, what: str, path: Path | None = None) -> RunDirectoryError:
    reason = err.strerror or type(err).__name__
    return RunDirectoryError(f"cannot {what} {err.filename or path or ''}: {reason}".replace("  ", " "))


def make_dir(path: Path) -> None:
    """``mkdir -p`` with one-line errors (a file in the way, a read-only folder, a full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error(err, "create the run directory") from None


# ----------------------------------------------------------------------------- one writer per run


def _holder_pid(path: Path) -> int | None:
    try:
        return json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (
            f"process {info['pid']} on {info['host']} ({info.get('command', 'targetgen')}, "
            f"started {info.get('started', '?')})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _write_holder(handle, command: str) -> None:
    """Who holds the lock, for the refusal message another process prints."""
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
    )
    handle.flush()


@contextmanager
def run_lock(folder: Path, command: str = "targetgen train") -> Iterator[None]:
    """Hold ``folder/.lock`` while the body runs; refuse at once if another process holds it.

    ``flock`` is released by the kernel when its process ends, also on kill -9:
    a lock whose process is gone is simply taken over. The file records the
    holder's pid, host and start time for the refusal message. A folder this
    call had to create is removed again when the lock cannot be taken.
    """
    created = not folder.exists()
    make_dir(folder)
    path = folder / LOCK
    try:
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "r+")
    except OSError as err:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        if path.is_symlink():
            raise RunDirectoryError(
                f"{path} is a symbolic link (to {os.readlink(path)}); targetgen never writes through one; remove it"
            ) from None
        raise _os_error(err, "lock", path) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryError(
                f"{folder} is in use by {_holder(path)}; wait for it to finish or stop it"
            ) from None
        try:
            _write_holder(handle, command)
        except OSError as err:  # a full disk: the run could not write its first checkpoint either
            handle.close()
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise _os_error(err, "write the lock", path) from None
        yield
    finally:
        if not handle.closed:
            handle.close()  # releases the flock; the file stays (removing it would race a waiting process)


def check_not_in_use(folder: Path) -> None:
    """Refuse at once, naming the holder, when another process holds ``folder``'s lock."""
    path = folder / LOCK
    if not path.is_file() or _holder_pid(path) == os.getpid():  # the lock this process holds is no obstacle
        return
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when closed
    except BlockingIOError:
        raise RunDirectoryError(f"{folder} is in use by {_holder(path)}; wait for it to finish or stop it") from None
    except OSError:
        pass  # unreadable lock file: run_lock reports it when it matters


def remove_orphans(run_dir: Path) -> None:
    """Temporary checkpoint files of a process killed while writing; only call under the lock."""
    folder = run_dir / CHECKPOINTS
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl. A torn last line (a kill mid-write) is left out;
    a broken line before the last is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise RunDirectoryError(
                f"{path}, line {number}: not a JSON record ({line[:60]!r}); the log was edited or corrupted"
            ) from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RunDirectoryError(
                f"{path}, line {number}: expected a record with a step, got {line[:60]!r}; "
                "the log was edited or corrupted"
            )
        records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run redoes the rest); rewritten atomically."""
    if not path.is_file():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    atomic_write(path, "".join(json.dumps(record) + "\n" for record in kept), "metrics log")


# ----------------------------------------------------------------------------- a run's config


# Keys a resumed run may change: how long it runs and how often it logs, evaluates and saves; where it lives.
CHANGEABLE_ON_RESUME = (
    "train.steps",
    "train.epochs",
    "train.max_seconds",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.loggers",
    "train.name",
    "train.out_dir",
    "evaluation.every",
)


def config_of_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), allow_config_change: bool = False):
    """The resolved config saved in ``run_dir``, with overrides of the keys a resumed run may change
    (any key with ``allow_config_change``) applied."""
    path = current_run_dir(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} is not a targetgen run directory (no {CONFIG})")
    raw = read_yaml(path)
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key not in CHANGEABLE_ON_RESUME and not allow_config_change:
            raise ConfigError(
                f"--set {key}: a resumed run keeps its config; only {', '.join(CHANGEABLE_ON_RESUME)} may change "
                "(or pass --allow-config-change)"
            )
        apply_override(raw, assignment)
    return from_dict(Config, raw)
