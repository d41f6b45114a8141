"""JSON for result files: a metric without a finite value is written as ``null``.

JSON has no Infinity or NaN (Python's ``json`` writes them anyway unless told
not to), yet some metrics have no value in some cases: the KL divergence of an
empty histogram (no high-quality samples) is infinite. Every evaluation result
goes through ``dumps``, which turns such values into ``None`` and refuses, with
``allow_nan=False``, any that slip through.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, also inside dicts and lists, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes non-finite floats as null and never writes Infinity or NaN."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
