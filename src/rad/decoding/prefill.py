"""A prompt through the model's own forward, in segments when it is long.

Attention's eager path (what bf16 generation on a CPU uses, `rad.evaluate.runner.generation_copy`) holds a
(batch, heads, queries, keys) score matrix in float32: quadratic in the prompt, 15 GB per layer for two 8k prompts
of Qwen2.5-Coder-0.5B, which killed a passkey run on a 24 GiB machine. Fed `PREFILL_SEGMENT` queries at a time,
the matrix is linear in the prompt. The cache carries each attention layer's keys and values and each Mamba2
mixer's conv window and SSM state from one segment to the next (transformers' Bamba continues its chunked scan from
the cached state), so the result is the one-call prefill's up to float rounding; a prompt that fits one segment
takes exactly the one call it always did.
"""

from __future__ import annotations

import torch

PREFILL_SEGMENT = 1024  # a multiple of every Mamba2 scan chunk rad uses (64 on CPU, 256 on GPU)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, segment: int = PREFILL_SEGMENT) -> torch.Tensor:
    """Fill `cache` with the prompt `input_ids` (b, t) and return the last position's logits (b, V).
    `attention_mask` (b, t) and `position_ids` (b, t) cover the whole prompt (left padding sits in the first
    segment; positions default to the count of unmasked tokens before each); each segment gets the mask up to its
    end and its own positions."""
    if segment < 1:
        raise ValueError(f"segment must be positive, not {segment}")
    t = input_ids.shape[1]
    if position_ids is None:  # a hybrid's cache does not tell transformers where a later segment starts: say it
        position_ids = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None
                        else torch.arange(t, device=input_ids.device).expand(input_ids.shape[0], t))
    logits = None
    for start in range(0, t, segment):
        end = min(start + segment, t)
        extra = {}
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask[:, :end]
        logits = model(input_ids=input_ids[:, start:end], cache=cache, use_cache=True, logits_to_keep=1,
                       position_ids=position_ids[:, start:end], **extra).logits[:, -1]
    if logits is None:
        raise ValueError("an empty prompt has nothing to prefill")
    return logits
