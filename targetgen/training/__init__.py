"""Training: the loop (``trainer``) and the two kinds of step it can run —
``standard`` (the tutorial's end-to-end GAN step) and ``decomposed`` (targets,
then regression)."""

from .trainer import (
    CHECKPOINT, Run, build_run, config_of_run, load_trained, new_run_dir, resolve_device, train, write_samples,
)

__all__ = ["CHECKPOINT", "Run", "build_run", "config_of_run", "load_trained", "new_run_dir", "resolve_device", "train", "write_samples"]
