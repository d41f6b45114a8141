"""Training: the loop (``trainer``), run directories (``rundir``), checkpoints, and
the two kinds of step the loop can run — ``standard`` (the tutorial's end-to-end
GAN step) and ``decomposed`` (targets, then regression).

Imported lazily: the run-directory checks the CLI makes before anything is
built (``rundir``) must not wait for torch.
"""

from __future__ import annotations

_EXPORTS = {
    "Run": "trainer", "build_run": "trainer", "load_generator": "trainer", "load_trained": "trainer", "plan_run_dir": "trainer",
    "resolve_device": "trainer", "train": "trainer", "write_samples": "trainer",
    "CHECKPOINT": "rundir", "config_of_run": "rundir",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
