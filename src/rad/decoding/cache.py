"""Preallocated decode caches: one KV buffer for all attention layers, fixed-size Mamba2 states.

Nothing grows by concatenation: keys and values are written in place at their positions, and a
rollback of rejected tokens is only `length` moving back (KV) plus restoring a recorded state (SSM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeCache:
    """Caches of one batch of sequences (b); `length` tokens are valid."""

    keys: torch.Tensor  # (attn_layers, b, kv_heads, max_len, head_dim)
    values: torch.Tensor  # (attn_layers, b, kv_heads, max_len, head_dim)
    conv: torch.Tensor  # (mamba_layers, b, conv_dim, d_conv): the last d_conv conv inputs
    ssm: torch.Tensor  # (mamba_layers, b, heads, head_dim, d_state), float32
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.conv, self.ssm))

    def live_bytes(self) -> int:
        """Bytes a decode step actually reads: the valid KV prefix plus the recurrent states."""
        kv = self.keys[:, :, :, : self.length]
        return 2 * kv.numel() * kv.element_size() + self.conv.numel() * self.conv.element_size() + (
            self.ssm.numel() * self.ssm.element_size()
        )

    def snapshot_recurrent(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv.clone(), self.ssm.clone()

    def restore_recurrent(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv.copy_(snapshot[0])
        self.ssm.copy_(snapshot[1])


def allocate_cache(
    *,
    attn_layers: int,
    mamba_layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    max_len: int,
    conv_dim: int,
    d_conv: int,
    ssm_heads: int,
    ssm_head_dim: int,
    d_state: int,
    dtype: torch.dtype,
    device: torch.device,
) -> DecodeCache:
    kv_shape = (attn_layers, batch, kv_heads, max_len, head_dim)
    return DecodeCache(
        keys=torch.zeros(kv_shape, dtype=dtype, device=device),
        values=torch.zeros(kv_shape, dtype=dtype, device=device),
        conv=torch.zeros((mamba_layers, batch, conv_dim, d_conv), dtype=dtype, device=device),
        ssm=torch.zeros((mamba_layers, batch, ssm_heads, ssm_head_dim, d_state), dtype=torch.float32, device=device),
    )
