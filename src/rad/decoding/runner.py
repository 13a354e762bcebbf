"""A lean decode forward over a Hugging Face model's own weights, with a preallocated `DecodeCache`.

Why not the model's own forward: at decode time a step moves few bytes of activations, so Python
and dispatch overhead (mask building, cache bookkeeping, concatenating caches) decide the speed.
This path reads each weight once per step, attends over the valid KV prefix in place (grouped-query
heads without repeating K/V), and runs each mixer's exact few-token step (`MixerKind.decode_step`, for
Mamba2 a recurrence in `rad.ops.ssd`). Prefill uses the model's own forward (compute-bound, already good) and imports its
caches. The model's forward is the reference twin this path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from rad.decoding.cache import DecodeCache, allocate_cache
from rad.decoding.prefill import prefill
from rad.errors import RadError
from rad.models.convert import HYBRID_MODEL_TYPE, SUPPORTED_FAMILIES
from rad.models.layers import decoder_layers
from rad.models.mixers import MixerKind, StateSpec, mixer_kind_of, mixer_layers

SUPPORTED = (*SUPPORTED_FAMILIES, HYBRID_MODEL_TYPE)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers computes it (normalise in float32, cast back, then scale), in one fused op.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with rotate_half(x)*sin = roll(x, half) * [-sin1, sin2]: one op, not four."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class PendingStates:
    """What each mixer layer's `decode_step` left for `commit`, in mixer-layer order (Mamba2: the conv inputs
    (b, conv_dim, d_conv + t) and the SSM states after every token (b, t, heads, head_dim, d_state))."""

    per_layer: list[tuple[torch.Tensor, ...]]


class FastDecoder:
    """Decode-time forward of a Llama / Qwen2 / Mistral model or a rad hybrid of it."""

    def __init__(self, model: nn.Module):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise RadError(f"The fast decoder supports {', '.join(SUPPORTED)}, not {config.model_type!r}.")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_positions = min(config.max_position_embeddings, window or config.max_position_embeddings)
        self.model = model
        self.config = config
        self.blocks = decoder_layers(model)
        self.mixers = mixer_layers(model)  # {layer: mixer module}
        self.is_mixer = [i in self.mixers for i in range(len(self.blocks))]
        self.slot: list[int] = []  # index into the cache's attention or mixer-state stacks
        n_attn = n_mixer = 0
        for m in self.is_mixer:
            self.slot.append(n_mixer if m else n_attn)
            n_mixer, n_attn = n_mixer + m, n_attn + (not m)
        self.n_attn, self.n_mixer = n_attn, n_mixer
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        base = model.model
        self.embed = base.embed_tokens
        self.final_norm = base.final_layernorm if hasattr(base, "final_layernorm") else base.norm
        self.lm_head = model.lm_head
        self.rotary = base.rotary_emb
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Every mixer of a hybrid has one kind and one geometry: the cache stacks their states.
        self.mixer_kind: MixerKind | None = None
        self.state_specs: tuple[StateSpec, ...] = ()
        for i, mixer in self.mixers.items():
            kind = mixer_kind_of(mixer)
            specs = kind.state_specs(mixer)
            if self.mixer_kind is not None and (kind is not self.mixer_kind or specs != self.state_specs):
                raise RadError(f"Layer {i}'s mixer differs in kind or shape from the others; the fast decoder "
                               "needs one mixer geometry per model.")
            self.mixer_kind, self.state_specs = kind, specs

    # ----------------------------------------------------------------- caches

    def new_cache(self, max_len: int, batch: int = 1) -> DecodeCache:
        if max_len > self.max_positions:
            raise RadError(
                f"A context of {max_len} tokens exceeds the model's {self.max_positions} positions; shorten the prompt "
                "or max_new_tokens."
            )
        self._ensure_rope(max_len)
        return allocate_cache(
            attn_layers=self.n_attn,
            batch=batch,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_len=max_len,
            mixer_layers=self.n_mixer,
            state_specs=self.state_specs,
            dtype=self.dtype,
            device=self.device,
        )

    def _ensure_rope(self, max_len: int) -> None:
        if self._cos is not None and self._cos.shape[0] >= max_len:
            return
        positions = torch.arange(max_len, device=self.device)[None]
        probe = torch.empty(1, device=self.device, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions)
        half = sin.shape[-1] // 2
        self._cos = cos[0]  # (max_len, head_dim)
        self._sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # signed for `_rope`

    # ----------------------------------------------------------------- prefill

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Run the prompt through the model's own forward (in segments when long, `rad.decoding.prefill`); import its
        caches; return last-token logits (b, V)."""
        b, t = input_ids.shape
        if t + 1 > cache.max_len:
            raise RadError(f"The prompt ({t} tokens) does not fit the cache of {cache.max_len} tokens.")
        hf_cache = DynamicCache(config=self.config)
        logits = prefill(self.model, input_ids, hf_cache)
        for i, layer in enumerate(hf_cache.layers):
            j = self.slot[i]
            if self.is_mixer[i]:
                self.mixer_kind.import_prefill_states(layer, cache.layer_states(j))
            else:
                cache.keys[j, :, :, :t].copy_(layer.keys)
                cache.values[j, :, :, :t].copy_(layer.values)
        cache.length = t
        return logits.float()

    # ----------------------------------------------------------------- decode

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, cache: DecodeCache, skip: frozenset[int] = frozenset()
    ) -> tuple[torch.Tensor, PendingStates]:
        """Logits (b, t, V) for `input_ids` at positions [cache.length, +t).

        Keys and values are written in place (positions past `length` are overwritten later if
        rejected); mixer states are returned, not applied: `commit` keeps the state after the n-th token.
        `skip` lists layers whose attention is skipped (the draft model); they read and write nothing.
        """
        b, t = input_ids.shape
        pos = cache.length
        if pos + t > cache.max_len:
            raise RadError(f"The cache holds {cache.max_len} tokens; cannot add {t} more at {pos}.")
        cos = self._cos[pos : pos + t]
        sin = self._sin[pos : pos + t]
        mask = None
        if t > 1:
            q_pos = torch.arange(pos, pos + t, device=self.device)
            k_pos = torch.arange(pos + t, device=self.device)
            mask = torch.zeros(t, pos + t, device=self.device, dtype=self.dtype)
            mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        pending = PendingStates([])
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if self.is_mixer[i]:
                h = _rms_norm(x, block.input_layernorm.weight, self.eps)
                out, layer_pending = self.mixer_kind.decode_step(self.mixers[i], h, cache.layer_states(self.slot[i]))
                pending.per_layer.append(layer_pending)
                x = x + out
            elif i not in skip:
                h = _rms_norm(x, block.input_layernorm.weight, self.eps)
                x = x + self._attention(block.self_attn, h, cache, self.slot[i], pos, cos, sin, mask)
            post = block.pre_ff_layernorm if hasattr(block, "pre_ff_layernorm") else block.post_attention_layernorm
            mlp = block.feed_forward if hasattr(block, "feed_forward") else block.mlp
            h = _rms_norm(x, post.weight, self.eps)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = _rms_norm(x, self.final_norm.weight, self.eps)
        return self.lm_head(x).float(), pending

    def commit(self, cache: DecodeCache, pending: PendingStates, n: int) -> None:
        """Keep the first `n` tokens of the last forward: advance `length`, set the mixer states after token n."""
        for j, layer_pending in enumerate(pending.per_layer):
            self.mixer_kind.commit(cache.layer_states(j), layer_pending, n)
        cache.length += n

    def _attention(self, attn, h, cache: DecodeCache, j: int, pos: int, cos, sin, mask) -> torch.Tensor:
        b, t, _ = h.shape
        hd, kvh = self.head_dim, self.kv_heads
        group = self.num_heads // kvh
        q = attn.q_proj(h).view(b, t, self.num_heads, hd).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, kvh, hd).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, kvh, hd).transpose(1, 2)
        q = _rope(q, cos, sin)
        k = _rope(k, cos, sin)
        end = pos + t
        cache.keys[j, :, :, pos:end] = k
        cache.values[j, :, :, pos:end] = v
        keys = cache.keys[j, :, :, :end]  # (b, kv, S, hd), a view
        values = cache.values[j, :, :, :end]
        # Query heads grouped under their key/value head: no copy of K or V.
        qg = q.reshape(b, kvh, group * t, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # (b, kv, group*t, S)
        if mask is not None:
            scores = (scores.view(b, kvh, group, t, end) + mask).view(b, kvh, group * t, end)
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values).view(b, self.num_heads, t, hd).transpose(1, 2).reshape(b, t, -1)
        return attn.o_proj(out)
