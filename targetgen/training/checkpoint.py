"""Checkpoints: written atomically, loaded safely, holding every RNG state.

A checkpoint is a plain dict of tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: no pickled code ever runs on load. It names
its ``format`` (refused when newer or unknown), the target source that wrote it,
the package version and the resolved config.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

FORMAT = 2  # 2: adds targets, version and config to format 1 (step, epoch, batch, order, networks, rng)


def atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``:
    an interrupted write leaves the previous checkpoint intact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.is_file() else "no earlier checkpoint exists"
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        raise CheckpointError(f"{path} is not a targetgen checkpoint (it holds {held}; "
                              f"expected a dict of format {FORMAT})")
    if not isinstance(state["format"], int) or state["format"] > FORMAT or state["format"] < 1:
        raise CheckpointError(f"checkpoint {path} has format {state['format']!r}; this targetgen reads formats 1 to "
                              f"{FORMAT}: upgrade targetgen to resume it")
    written_by = state.get("targets") or ("standard" if "source" not in state.get("strategy", {}) else None)
    if targets is not None and written_by is not None and written_by != targets:
        raise CheckpointError(f"checkpoint {path} was written by target source {written_by!r}; "
                              f"this run's config uses {targets!r}")
    return state


def rng_state() -> dict:
    """Every random number generator the run draws from."""
    mt_name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
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
