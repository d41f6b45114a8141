"""Which way each metric is better: read by the best-checkpoint callback, reports and tuning, without torch."""

from __future__ import annotations

# Metrics where smaller is better (FID, KID and the KL divergences, in every feature space); every other
# reported metric is better larger.
LOWER_IS_BETTER = ("fid", "kid", "kl_to_uniform")


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in LOWER_IS_BETTER)
