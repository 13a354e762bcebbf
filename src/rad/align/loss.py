"""Alignment's loss: each layer's squared error normalised by its target's mean square (a relative error).

Normalising per layer makes every converted layer count alike whatever the scale of its attention output (early
and late layers differ by orders of magnitude), and makes the number readable: a mixer that outputs zero (the RAD
init) has relative error exactly 1. Sums are in float32 whatever the compute dtype.
"""

from __future__ import annotations

import torch


def squared_sums(prediction: torch.Tensor, target: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of squared targets) over real tokens (attention_mask 1), in float32."""
    error = (prediction.float() - target.float()).pow(2).sum(-1)
    energy = target.float().pow(2).sum(-1)
    if attention_mask is not None:
        weight = attention_mask.to(torch.float32)
        error, energy = error * weight, energy * weight
    return error.sum(), energy.sum()


def relative_error(error_sum: torch.Tensor, energy_sum: torch.Tensor) -> torch.Tensor:
    """sum |y - t|^2 / sum |t|^2; a layer whose target is all zero counts its absolute error."""
    return error_sum / energy_sum.clamp_min(torch.finfo(torch.float32).tiny)
