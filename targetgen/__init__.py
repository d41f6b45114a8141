"""targetgen: train generators by separating target generation from regression.

The public API for target-source plugins::

    from targetgen import TargetGenerator, Targets, Batch, Generated, TrainingContext, bounded

Imported lazily, so that ``targetgen --help`` and config validation do not
wait for torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Batch", "Generated", "TargetGenerator", "Targets", "TrainingContext", "bounded", "__version__"]


def __getattr__(name: str):
    if name == "bounded":
        from .config import bounded

        return bounded
    if name in ("Batch", "Generated", "TargetGenerator", "Targets", "TrainingContext"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'targetgen' has no attribute {name!r}")
