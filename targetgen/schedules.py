"""Learning-rate schedules for λ1 (inversion) and λ2 (regression)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def scheduled(value: float, kind: str, step: int, total_steps: int, final_fraction: float = 0.0) -> float:
    """``value`` at ``step`` of ``total_steps``; linear and cosine decay towards
    ``value * final_fraction`` at the last step."""
    if kind == "constant":
        return value
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    end = value * final_fraction
    if kind == "linear":
        return value + (end - value) * progress
    if kind == "cosine":
        return end + (value - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
