"""Files that must never be torn: written whole or not at all.

Every such file (checkpoints, best.json, eval.json, summaries, the truncated
metrics log, cached statistics) goes through ``atomic_write``: a temporary file
in the same folder (``.NAME.tmp-PID``), flushed and fsynced, renamed over the
target, then the folder fsynced so that the rename itself survives a crash.
A rename replaces a symbolic link at the target instead of writing through it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import WriteError


def temporary_name(path: Path) -> Path:
    """The temporary file ``atomic_write`` uses for ``path`` (``.NAME.tmp-PID``: hidden, one per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # a folder that cannot be opened (some platforms): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, content: bytes | str | Callable[[IO[bytes]], None], what: str = "") -> None:
    """Make ``path`` hold ``content`` (bytes, text, or a function writing to a binary file), atomically.

    A failure (full disk, read-only folder; torch reports a full disk as a RuntimeError of its zip
    writer) leaves the previous file as it was and raises a ``WriteError`` naming ``what`` and ``path``.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {what or 'file'} is intact" if path.is_file() else "nothing was written"
        raise WriteError(f"cannot write {what + ' ' if what else ''}{path} ({_reason(err)}); {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, record: Any, what: str = "", dumps: Callable[..., str] = json.dumps) -> None:
    """``record`` as indented JSON (``dumps``: e.g. ``jsonsafe.dumps``), atomically."""
    atomic_write(path, dumps(record, indent=1) + "\n", what)


def atomic_copy(source: Path, target: Path, what: str = "") -> None:
    """``target`` becomes the file ``source`` is now, atomically: a hard link (no second write), else a copy."""
    tmp = temporary_name(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        try:
            shutil.copyfile(source, tmp, follow_symlinks=False)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise WriteError(f"cannot write {what + ' ' if what else ''}{target} ({_reason(err)})") from None
    os.replace(tmp, target)
    _sync_folder(target.parent)


def check_writable(path: Path, what: str) -> None:
    """Fail before the work, not after it: ``path``'s folder must exist (or be creatable) and take a file."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(Path(path))
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644))
        probe.unlink()
    except OSError as err:
        raise WriteError(f"cannot write {what} {path} ({_reason(err)}); nothing was computed") from None
