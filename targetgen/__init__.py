"""targetgen: train generators by separating target generation from regression.

The public API for target-source plugins::

    from targetgen import TargetGenerator, Targets, Batch, TrainingContext
"""

from .api import Batch, TargetGenerator, Targets, TrainingContext

__version__ = "0.1.0"
__all__ = ["Batch", "TargetGenerator", "Targets", "TrainingContext", "__version__"]
