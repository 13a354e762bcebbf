"""Which precision alignment's teacher pass runs in, by the one owner of the choice (`rad.utils.precision`).

Alignment records the precision by name ('bf16' / 'fp32') in its settings and resume identity; these are thin
names over the shared detection, so `auto` means the same for `rad align` as for `rad distill`.
"""

from __future__ import annotations

import torch

from rad.errors import RadError
from rad.utils.precision import PRECISIONS, bf16_features, precision_name
from rad.utils.precision import resolve_precision as resolve_dtype

__all__ = ["PRECISIONS", "bf16_supported", "check_precision", "resolve_precision"]


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    return bool(bf16_features(device))


def check_precision(precision: str) -> None:
    """A RadError naming the choices for an unknown precision (the check settings run before any work)."""
    if precision not in PRECISIONS:
        raise RadError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32': `auto` is bf16 where the device computes it fast, an explicit choice is checked."""
    return precision_name(resolve_dtype(precision, device))
