"""Confidence intervals for accuracies: Wilson's, which stays inside [0, 1] and behaves at 0/n and n/n."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval for `correct` successes in `total` trials ((0, 1) when total is 0)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if correct <= 0 else max(0.0, centre - half)
    high = 1.0 if correct >= total else min(1.0, centre + half)
    return low, high
