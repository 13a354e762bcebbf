"""Greedy completions for a list of prompts: rad's engine one at a time, or `greedy_batch` in left-padded batches.

Batch size 1 on rad's decode engine is the default (fastest on CPU, no padding at all). Batches run
the model's own forward on left-padded prompts with an attention mask (`greedy_batch`); Bamba hybrids
mask padded positions in their Mamba2 mixers, so a padded prompt gets the same greedy answer as the
prompt alone (tests check this against HF `generate` and against each prompt alone). Unlike `generate`,
a row that has finished leaves the batch and its caches: a batch no longer costs its longest answer
times its full width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rad.decoding.prefill import PREFILL_SEGMENT, prefill
from rad.decoding.speculative import greedy_generate
from rad.models.tokens import chat_add_special_tokens, eos_token_ids, padding_token_id, render_chat


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    batch_size: int = 1
    chat: bool = True


def render_prompt(tokenizer, messages: list[dict], raw: str, chat: bool, response_prefix: str = "") -> str:
    """The prompt text: `raw` without `chat`, else the messages by `render_chat` (template or its fallback) with the
    assistant's answer begun by `response_prefix`."""
    if not chat:
        return raw
    return render_chat(tokenizer, messages, add_generation_prompt=True) + response_prefix


def truncate_at(text: str, stops: tuple[str, ...]) -> str:
    """Cut a completion at the first stop string (the model's next turn or the end-of-answer tag)."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


class Generator:
    """Greedy, deterministic completions; `calls` counts prompts generated (resume tests read it)."""

    def __init__(self, model, tokenizer, config: GenerationConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos = eos_token_ids(tokenizer, model)
        self.calls = 0

    def _encode_kwargs(self) -> dict:
        # A chat template already holds BOS where the model wants one; plain text and the fallback do not.
        return {"add_special_tokens": not self.config.chat or chat_add_special_tokens(self.tokenizer)}

    def generate(self, prompts: list[str]) -> list[str]:
        self.calls += len(prompts)
        if self.config.batch_size <= 1 or len(prompts) == 1:
            return [self._one(p) for p in prompts]
        return self._batch(prompts)

    @torch.no_grad()
    def _one(self, prompt: str) -> str:
        ids = self.tokenizer(prompt, return_tensors="pt", **self._encode_kwargs()).input_ids
        result = greedy_generate(self.model, ids, self.config.max_new_tokens, eos_token_id=self.eos)
        return self.tokenizer.decode(result.tokens, skip_special_tokens=True)

    @torch.no_grad()
    def _batch(self, prompts: list[str]) -> list[str]:
        tok = self.tokenizer
        pad = padding_token_id(tok, self.model)
        old_side, old_pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.convert_ids_to_tokens(pad)
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, **self._encode_kwargs())
        finally:
            tok.padding_side, tok.pad_token = old_side, old_pad
        device = next(self.model.parameters()).device
        rows = greedy_batch(self.model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                            self.config.max_new_tokens, self.eos)
        return [tok.decode(row, skip_special_tokens=True) for row in rows]


@torch.no_grad()
def greedy_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_ids: list[int], prefill_segment: int = PREFILL_SEGMENT) -> list[list[int]]:
    """Greedy new tokens (end-of-sequence excluded) of each left-padded row, dropping rows as they finish.

    The steps are those of HF `generate` with greedy decoding: positions counted over the unpadded
    tokens, the mask grown by one column per step. A finished row is removed from the batch, the
    mask and every cache layer (`Cache.reorder_cache`), so the rows still running pay only for themselves.
    A long prompt is prefilled in segments of `prefill_segment` tokens (`rad.decoding.prefill`).
    """
    batch = input_ids.shape[0]
    results: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens < 1:
        return results
    stops = torch.tensor(sorted(set(eos_token_ids)), device=input_ids.device)
    live = torch.arange(batch, device=input_ids.device)  # original row of each batch row
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = prefill(model, input_ids, cache, attention_mask=mask, position_ids=positions, segment=prefill_segment)
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = logits.float().argmax(-1)
        done = torch.isin(tokens, stops)
        for row, token, stop in zip(live.tolist(), tokens.tolist(), done.tolist(), strict=True):
            if not stop:
                results[row].append(token)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.reorder_cache(keep)
            live, tokens, mask, next_position = live[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                       cache=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return results
