"""targetgen: train generators by separating target generation from regression.

The public API for target-source plugins::

    from targetgen import TargetSource, Targets, Batch, Generated, TrainingContext, bounded

(``TargetGenerator``, the name before 0.2, is a deprecated alias of ``TargetSource``.)

Imported lazily, so that ``targetgen --help`` and config validation do not
wait for torch.
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["Batch", "Generated", "TargetSource", "Targets", "TrainingContext", "bounded", "__version__"]


def __getattr__(name: str):
    if name == "bounded":
        from .config import bounded

        return bounded
    if name in ("Batch", "Generated", "TargetSource", "TargetGenerator", "Targets", "TrainingContext"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'targetgen' has no attribute {name!r}")
