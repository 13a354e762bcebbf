"""The draft model of the search: the same model with the attention sub-layer of some layers skipped."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import decoder_layers


class SkippedAttention(nn.Module):
    """Stands in for a layer's `self_attn`: contributes zero to the residual stream and touches no cache.

    It keeps a reference to the module it replaces so the swap can be undone, but does not register
    it as a submodule (the replaced weights are not part of the model while skipped).
    """

    def __init__(self, replaced: nn.Module):
        super().__init__()
        self.__dict__["replaced"] = replaced

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


@contextlib.contextmanager
def skip_attention(model: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Within the block, the attention of `layers` returns zeros: the residual passes, the MLP still runs.

    The swap is per model instance (no global state), nests (an inner block may skip more layers, or the
    same ones again), and is undone on exit, also when the block raises. Skipped layers never call their
    KV cache, so their cached keys and values stay as they were.
    """
    blocks = decoder_layers(model)
    indices = sorted(set(int(i) for i in layers))
    for i in indices:
        if not 0 <= i < len(blocks):
            raise RadError(f"Cannot skip layer {i}: the model has layers 0..{len(blocks) - 1}.")
        if not hasattr(blocks[i], "self_attn"):
            raise RadError(f"Cannot skip layer {i}: it has no attention (it is a {type(blocks[i]).__name__} mixer).")
    saved = [(i, blocks[i].self_attn) for i in indices]
    try:
        for i, original in saved:
            blocks[i].self_attn = SkippedAttention(original)
        yield model
    finally:
        for i, original in saved:
            blocks[i].self_attn = original
