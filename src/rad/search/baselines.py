"""Baseline masks the search is compared with, all within the same candidates (kept layers excluded).

uniform (evenly spaced, as MambaInLlama replaces every other layer), first-k, last-k, random-k (seeds
0..n-1), and importance: skip one layer at a time, take the k whose single skip hurts the objective least.
Those single-layer measurements are also the per-layer redundancy profile.
"""

from __future__ import annotations

import numpy as np

from rad.models.layers import uniform_layers
from rad.search.config import SearchSpace


def fixed_baselines(space: SearchSpace, random_count: int) -> dict[str, tuple[int, ...]]:
    """Named masks that need no measurement to choose."""
    candidates, k = list(space.candidates), space.k
    masks = {
        "uniform": tuple(candidates[i] for i in uniform_layers(k, len(candidates))),
        "first-k": tuple(candidates[:k]),
        "last-k": tuple(candidates[-k:]),
    }
    for s in range(random_count):
        masks[f"random-k (seed {s})"] = space.random_mask(np.random.default_rng(s))
    return masks


def importance_mask(profile: dict[int, float], space: SearchSpace) -> tuple[int, ...]:
    """The k candidates whose single skip scores best (ties go to the lower layer)."""
    ranked = sorted(space.candidates, key=lambda layer: (-profile[layer], layer))
    return tuple(sorted(ranked[: space.k]))
