"""Checkpoints: written atomically, loaded safely, holding every RNG state.

A checkpoint is a plain dict of tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: no pickled code ever runs on load. It names
its ``format`` (refused when newer or unknown), the target source that wrote it,
the package version and the resolved config.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from ..config import to_dict
from ..errors import CheckpointError, ConfigError, WriteError
from ..files import atomic_write
from .run import Position, Run
from .rundir import CHANGEABLE_ON_RESUME

FORMAT = 2  # 2: adds targets, version and config to format 1 (step, epoch, batch, order, networks, rng)


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` through ``files.atomic_write``: an interrupted write leaves the previous checkpoint intact."""
    try:
        atomic_write(path, lambda handle: torch.save(obj, handle), "checkpoint")
    except WriteError as err:
        raise CheckpointError(str(err)) from None


# What a checkpoint of format 2 holds, and the type of each entry (checked on load, before anything is restored).
ENTRIES = {
    "step": int,
    "epoch": int,
    "batch": int,
    "order": torch.Tensor,
    "generator": dict,
    "strategy": dict,
    "rng": dict,
}
RNG_ENTRIES = ("torch", "numpy", "python")


def _check_structure(state: dict, path: Path) -> None:
    missing = [key for key in ENTRIES if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {', '.join(missing)} "
            f"(expected {', '.join(ENTRIES)}); it was not written by targetgen, or was edited"
        )
    for key, kind in ENTRIES.items():
        value = state[key]
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise CheckpointError(
                f"checkpoint {path}: {key} is {value!r:.60}, expected "
                f"{'a non-negative integer' if kind is int else 'a ' + kind.__name__}"
            )
    missing = [key for key in RNG_ENTRIES if key not in state["rng"]]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its random number generator states lack {', '.join(missing)}")


def load_checkpoint(path: Path, targets: str | None = None) -> dict:
    """The checkpoint at ``path``, checked: a dict of targetgen's format, written by ``targets`` (when given)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written completely")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's message suggests weights_only=False, which would run whatever code the file holds: never.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it holds Python objects other than tensors and plain data, which targetgen never unpickles"
        raise CheckpointError(f"checkpoint {path} ({size:,} bytes) cannot be read: {first}") from None
    if not isinstance(state, dict) or "format" not in state:
        held = "a dict without a format field" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(
            f"{path} is not a targetgen checkpoint (it holds {held}; expected a dict of format {FORMAT})"
        )
    if not isinstance(state["format"], int) or state["format"] > FORMAT or state["format"] < 1:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format']!r}; this targetgen reads formats 1 to "
            f"{FORMAT}: upgrade targetgen to resume it"
        )
    _check_structure(state, path)
    written_by = state.get("targets") or ("standard" if "source" not in state["strategy"] else None)
    if targets is not None and written_by is not None and written_by != targets:
        raise CheckpointError(
            f"checkpoint {path} was written by target source {written_by!r}; this run's config uses {targets!r}"
        )
    return state


def rng_state() -> dict:
    """Every random number generator the run draws from."""
    mt_name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- a run's checkpoint


def save(run: Run, path: Path, pos: Position, order: Tensor) -> None:
    """Everything exact resume needs, atomically: networks, optimisers, RNG states, the data order."""
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
        path,
    )


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        return {prefix: raw}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, dict[str, Any]]:
    """Keys whose value differs between a checkpoint's config and the run's, but for CHANGEABLE_ON_RESUME;
    keys only one side has (a newer or older targetgen) are left out."""
    before, now = _flat(saved), _flat(current)
    return {
        key: {"checkpoint": before[key], "now": now[key]}
        for key in sorted(before.keys() & now.keys())
        if before[key] != now[key] and key not in CHANGEABLE_ON_RESUME
    }


def restore(run: Run, path: Path, allow_config_change: bool = False) -> tuple[Position, Tensor, dict]:
    """Load the checkpoint at ``path`` into ``run``: refused in one line when it does not fit, or when the
    run's config differs from the checkpoint's (unless ``allow_config_change``; the changes are returned)."""
    state = load_checkpoint(path, targets=run.config.targets.name)
    t = run.config.train
    if state["step"] > run.total_steps:
        key, value = ("train.steps", t.steps) if t.steps is not None else ("train.epochs", t.epochs)
        raise ConfigError(
            f"{key}: {value} gives {run.total_steps} steps, fewer than the checkpoint's "
            f"{state['step']}; a resumed run can only be extended"
        )
    changes = config_changes(state["config"], to_dict(run.config)) if isinstance(state.get("config"), dict) else {}
    if changes and not allow_config_change:
        shown = "; ".join(f"{k}: {v['checkpoint']!r} in the checkpoint, {v['now']!r} now" for k, v in changes.items())
        raise ConfigError(
            f"--resume: {path.parent.parent / 'config.yaml'} differs from the config its checkpoint was "
            f"trained with ({shown}); put it back, or continue with the new values with "
            "--allow-config-change (recorded in metrics.jsonl)"
        )
    try:
        run.generator.load_state_dict(state["generator"])
        run.strategy.load_state_dict(state["strategy"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this run's networks or optimisers: {first}") from None
    try:
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path}: its random number generator states cannot be restored ({err})"
        ) from None
    position = Position(
        state["step"], state["epoch"], state["batch"], state.get("images", 0), state.get("seconds", 0.0)
    )
    return position, state["order"], changes
