"""Greedy completions for a list of prompts: rad's engine one at a time, or HF generate in left-padded batches.

Batch size 1 on rad's decode engine is the default (fastest on CPU, no padding at all). Batches use
`model.generate` with left padding and an attention mask; Bamba hybrids mask padded positions in their
Mamba2 mixers, so a padded prompt gets the same greedy answer as the prompt alone (tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rad.decoding.speculative import greedy_generate
from rad.models.tokens import chat_add_special_tokens, eos_token_ids, render_chat


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    batch_size: int = 1
    chat: bool = True


def render_prompt(tokenizer, messages: list[dict], raw: str, chat: bool) -> str:
    """The prompt text: `raw` without `chat`, else the messages by `render_chat` (template or its fallback)."""
    if not chat:
        return raw
    return render_chat(tokenizer, messages, add_generation_prompt=True)


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
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]
        old_side, old_pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.convert_ids_to_tokens(pad)
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, **self._encode_kwargs())
        finally:
            tok.padding_side, tok.pad_token = old_side, old_pad
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        out = self.model.generate(
            **enc,
            max_new_tokens=self.config.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=self.eos,
            pad_token_id=pad,
        )
        new = out[:, enc["input_ids"].shape[1]:]
        texts = []
        for row in new.tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos), len(row))
            texts.append(tok.decode(row[:end], skip_special_tokens=True))
        return texts
