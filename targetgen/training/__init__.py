"""Training: the builder (config → run), run directories (``rundir``), the loop (``trainer``),
the two kinds of step (``standard``, ``decomposed``), callbacks and loggers, checkpoints, and the
types they share (``run``).

Imported lazily: the run-directory checks the CLI makes before anything is
built (``rundir``) must not wait for torch.
"""

from __future__ import annotations

_EXPORTS = {
    "Run": "run",
    "build_run": "builder",
    "load_generator": "builder",
    "load_trained": "builder",
    "resolve_device": "builder",
    "train": "trainer",
    "write_samples": "callbacks",
    "CHECKPOINT": "rundir",
    "config_of_run": "rundir",
    "plan_run_dir": "rundir",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
