"""The search's stand-ins for a model: attention skipped (the draft), or replaced by given mixers (a hybrid in
place, for selection after alignment)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.models.mixers import mixer_output


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


class MixerInPlaceOfAttention(nn.Module):
    """Stands in for a layer's `self_attn`: the given mixer on the same (normalised) input, nothing cached.

    What a hybrid with this layer converted computes, without building the hybrid: a Bamba layer feeds its mixer
    `input_layernorm(h)` and adds the output to the residual, exactly where the attention was. Padding is not
    passed on (the attention's mask is 4-D); callers right-pad, which a causal mixer never sees.
    """

    def __init__(self, replaced: nn.Module, mixer: nn.Module):
        super().__init__()
        self.__dict__["replaced"] = replaced
        self.__dict__["mixer"] = mixer  # not a submodule: the model's parameters stay the model's

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return mixer_output(self.__dict__["mixer"], hidden_states), None


@contextlib.contextmanager
def substitute_attention(model: nn.Module, mixers: Mapping[int, nn.Module]) -> Iterator[nn.Module]:
    """Within the block, the attention of each layer in `mixers` is replaced by that mixer (the hybrid with those
    layers converted, in place); undone on exit, also when the block raises. Per instance, no global state."""
    blocks = decoder_layers(model)
    for i in mixers:
        if not 0 <= int(i) < len(blocks):
            raise RadError(f"Cannot replace layer {i}: the model has layers 0..{len(blocks) - 1}.")
        if not hasattr(blocks[int(i)], "self_attn"):
            raise RadError(f"Cannot replace layer {i}: it has no attention (it is a {type(blocks[int(i)]).__name__} "
                           "mixer).")
    saved = [(int(i), blocks[int(i)].self_attn) for i in sorted(mixers)]
    try:
        for i, original in saved:
            blocks[i].self_attn = MixerInPlaceOfAttention(original, mixers[i])
        yield model
    finally:
        for i, original in saved:
            blocks[i].self_attn = original
