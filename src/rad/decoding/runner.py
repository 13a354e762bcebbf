"""A lean decode forward over a Hugging Face model's own weights, with a preallocated `DecodeCache`.

Why not the model's own forward: at decode time a step moves few bytes of activations, so Python
and dispatch overhead (mask building, cache bookkeeping, concatenating caches) decide the speed.
This path reads each weight once per step, attends over the valid KV prefix in place (grouped-query
heads without repeating K/V), and runs Mamba2 mixers as an exact few-token recurrence
(`rad.ops.ssd`). Prefill uses the model's own forward (compute-bound, already good) and imports its
caches. The model's forward is the reference twin this path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from rad.decoding.cache import DecodeCache, allocate_cache
from rad.errors import RadError
from rad.models.layers import decoder_layers
from rad.ops.ssd import ssd_scan_with_states

SUPPORTED = ("llama", "qwen2", "mistral", "bamba")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers computes it (normalise in float32, cast back, then scale), in one fused op.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with rotate_half(x)*sin = roll(x, half) * [-sin1, sin2]: one op, not four."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class PendingStates:
    """Mamba2 states after each token of one forward, per mamba layer, until `commit` picks one."""

    conv_inputs: list[torch.Tensor]  # (b, conv_dim, d_conv + t): old window then the new inputs
    ssm_states: list[torch.Tensor]  # (b, t, heads, head_dim, d_state)


class FastDecoder:
    """Decode-time forward of a Llama / Qwen2 / Mistral model or a Bamba hybrid."""

    def __init__(self, model: nn.Module):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise RadError(f"The fast decoder supports {', '.join(SUPPORTED)}, not {config.model_type!r}.")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_positions = min(config.max_position_embeddings, window or config.max_position_embeddings)
        self.model = model
        self.config = config
        self.blocks = decoder_layers(model)
        self.is_mamba = [hasattr(b, "mamba") for b in self.blocks]
        self.slot: list[int] = []  # index into the cache's attention or mamba stack
        n_attn = n_mamba = 0
        for m in self.is_mamba:
            self.slot.append(n_mamba if m else n_attn)
            n_mamba, n_attn = n_mamba + m, n_attn + (not m)
        self.n_attn, self.n_mamba = n_attn, n_mamba
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        base = model.model
        self.embed = base.embed_tokens
        self.final_norm = base.final_layernorm if config.model_type == "bamba" else base.norm
        self.lm_head = model.lm_head
        self.rotary = base.rotary_emb
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        mixer = next((b.mamba for b in self.blocks if hasattr(b, "mamba")), None)
        self.mixer_dims = None
        if mixer is not None:
            self.mixer_dims = dict(
                conv_dim=mixer.conv_dim,
                d_conv=mixer.conv_kernel_size,
                ssm_heads=mixer.num_heads,
                ssm_head_dim=mixer.head_dim,
                d_state=mixer.ssm_state_size,
            )

    # ----------------------------------------------------------------- caches

    def new_cache(self, max_len: int, batch: int = 1) -> DecodeCache:
        if max_len > self.max_positions:
            raise RadError(
                f"A context of {max_len} tokens exceeds the model's {self.max_positions} positions; shorten the prompt "
                "or max_new_tokens."
            )
        self._ensure_rope(max_len)
        dims = self.mixer_dims or dict(conv_dim=1, d_conv=1, ssm_heads=1, ssm_head_dim=1, d_state=1)
        return allocate_cache(
            attn_layers=self.n_attn,
            mamba_layers=self.n_mamba,
            batch=batch,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_len=max_len,
            dtype=self.dtype,
            device=self.device,
            **dims,
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
        """Run the prompt through the model's own forward; import its caches; return last-token logits (b, V)."""
        b, t = input_ids.shape
        if t + 1 > cache.max_len:
            raise RadError(f"The prompt ({t} tokens) does not fit the cache of {cache.max_len} tokens.")
        hf_cache = DynamicCache(config=self.config)
        out = self.model(input_ids=input_ids, cache=hf_cache, use_cache=True, logits_to_keep=1)
        for i, layer in enumerate(hf_cache.layers):
            j = self.slot[i]
            if self.is_mamba[i]:
                cache.conv[j].copy_(layer.conv_states[0][..., -cache.conv.shape[-1] :])
                cache.ssm[j].copy_(layer.recurrent_states[0])
            else:
                cache.keys[j, :, :, :t].copy_(layer.keys)
                cache.values[j, :, :, :t].copy_(layer.values)
        cache.length = t
        return out.logits[:, -1].float()

    # ----------------------------------------------------------------- decode

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, cache: DecodeCache, skip: frozenset[int] = frozenset()
    ) -> tuple[torch.Tensor, PendingStates]:
        """Logits (b, t, V) for `input_ids` at positions [cache.length, +t).

        Keys and values are written in place (positions past `length` are overwritten later if
        rejected); Mamba2 states are returned, not applied: `commit` keeps the state after the n-th token.
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
        pending = PendingStates([], [])
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if self.is_mamba[i]:
                h = _rms_norm(x, block.input_layernorm.weight, self.eps)
                x = x + self._mamba(block.mamba, h, cache, self.slot[i], pending)
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
        """Keep the first `n` tokens of the last forward: advance `length`, set the Mamba2 states after token n."""
        d_conv = cache.conv.shape[-1]
        for j, (inputs, states) in enumerate(zip(pending.conv_inputs, pending.ssm_states, strict=True)):
            cache.conv[j].copy_(inputs[..., n : n + d_conv])
            cache.ssm[j].copy_(states[:, n - 1])
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

    def _mamba(self, mixer, h, cache: DecodeCache, j: int, pending: PendingStates) -> torch.Tensor:
        b, t, _ = h.shape
        heads, p, n, groups = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
        d_inner = mixer.intermediate_size
        zxbcdt = mixer.in_proj(h)
        z, xbc, dt = zxbcdt.split([d_inner, mixer.conv_dim, heads], dim=-1)
        inputs = torch.cat([cache.conv[j], xbc.transpose(1, 2)], dim=-1)  # (b, conv_dim, d_conv + t)
        # Depthwise causal conv as a windowed multiply-add: for a few tokens this is far cheaper than
        # F.conv1d's oneDNN path (~0.3 ms per call here for 4 taps).
        windows = inputs[..., 1:].unfold(-1, mixer.conv_kernel_size, 1)  # (b, conv_dim, t, d_conv)
        conv = (windows * mixer.conv1d.weight[:, 0, None, :]).sum(-1)
        if mixer.conv1d.bias is not None:
            conv = conv + mixer.conv1d.bias[:, None]
        xbc = F.silu(conv).transpose(1, 2)  # (b, t, conv_dim)
        x, B, C = xbc.split([d_inner, groups * n, groups * n], dim=-1)
        dt = F.softplus(dt.float() + mixer.dt_bias.float())
        low, high = mixer.time_step_limit
        if low > 0.0 or high != float("inf"):
            dt = dt.clamp(low, high)
        B = B.reshape(b, t, groups, n)
        C = C.reshape(b, t, groups, n)
        if groups != heads:
            B = B.repeat_interleave(heads // groups, dim=2)
            C = C.repeat_interleave(heads // groups, dim=2)
        A = -torch.exp(mixer.A_log.float())
        y, states = ssd_scan_with_states(cache.ssm[j], x.reshape(b, t, heads, p), dt, A, B, C, mixer.D.float())
        pending.conv_inputs.append(inputs)
        pending.ssm_states.append(states)
        y = y.reshape(b, t, d_inner) * F.silu(z.float())
        norm = mixer.norm
        yg = y.view(b, t, groups, d_inner // groups) if norm.group_size != d_inner else y[..., None, :]
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        y = norm.weight * yg.reshape(b, t, d_inner)
        return mixer.out_proj(y.to(h.dtype))
