"""Preallocated decode caches: one KV buffer for all attention layers, fixed-size mixer states.

Nothing grows by concatenation: keys and values are written in place at their positions, and a
rollback of rejected tokens is only `length` moving back (KV) plus restoring a recorded state (mixers).
What states a mixer keeps, and their shapes, its `MixerKind.state_specs` says (rad.models.mixers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rad.models.mixers import StateSpec


@dataclass
class DecodeCache:
    """Caches of one batch of sequences (b); `length` tokens are valid."""

    keys: torch.Tensor  # (attn_layers, b, kv_heads, max_len, head_dim)
    values: torch.Tensor  # (attn_layers, b, kv_heads, max_len, head_dim)
    # One stack per state the mixer kind names, (mixer_layers, b, *spec.shape): Mamba2's conv window
    # (b, conv_dim, d_conv) and SSM state (b, heads, head_dim, d_state) in float32. Empty without mixers.
    states: tuple[torch.Tensor, ...] = ()
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def layer_states(self, slot: int) -> tuple[torch.Tensor, ...]:
        """The states of the `slot`-th mixer layer, as views that writes go through: each (b, *spec.shape)."""
        return tuple(stack[slot] for stack in self.states)

    def state_bytes(self) -> int:
        """Bytes of every mixer state (fixed, whatever the context length)."""
        return sum(t.numel() * t.element_size() for t in self.states)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values)) + self.state_bytes()

    def live_bytes(self) -> int:
        """Bytes a decode step actually reads: the valid KV prefix plus the recurrent states."""
        kv = self.keys[:, :, :, : self.length]
        return 2 * kv.numel() * kv.element_size() + self.state_bytes()

    def snapshot_recurrent(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in self.states)

    def restore_recurrent(self, snapshot: tuple[torch.Tensor, ...]) -> None:
        for stack, saved in zip(self.states, snapshot, strict=True):
            stack.copy_(saved)


def allocate_cache(
    *,
    attn_layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    max_len: int,
    mixer_layers: int,
    state_specs: tuple[StateSpec, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> DecodeCache:
    """Zeroed caches: KV for `attn_layers` layers, and each of `state_specs` for `mixer_layers` layers."""
    kv_shape = (attn_layers, batch, kv_heads, max_len, head_dim)
    return DecodeCache(
        keys=torch.zeros(kv_shape, dtype=dtype, device=device),
        values=torch.zeros(kv_shape, dtype=dtype, device=device),
        states=tuple(
            torch.zeros((mixer_layers, batch, *spec.shape), dtype=spec.dtype or dtype, device=device)
            for spec in state_specs
        ),
    )
