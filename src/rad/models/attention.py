"""Sizes of a source model's attention layer: what a replacement mixer is shaped from and weighed against."""

from __future__ import annotations


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_parameters(config, bias: bool) -> int:
    """q, k, v, o of one attention layer of `config` (q/k/v biases when `bias`, none on o)."""
    hd, heads, kv, hidden = head_dim_of(config), config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    weights = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden
    return weights + ((heads + 2 * kv) * hd if bias else 0)
