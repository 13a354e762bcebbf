"""Text generation on rad's decode engine (plain, or self-speculative with some attention skipped).

`rad generate` lives here so the CLI stays thin; prompts and end-of-turn ids come from `rad.models.tokens`,
the same as the search and the evaluation use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rad.decoding.speculative import DraftConfig, SamplingConfig, SpeculativeResult, speculative_generate
from rad.errors import RadError
from rad.models.loading import LoadedModel
from rad.models.tokens import encode_chat, eos_token_ids


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    decoding: SpeculativeResult
    baseline: SpeculativeResult | None = None  # plain decoding of the same prompt, when asked to compare

    @property
    def new_tokens(self) -> int:
        return int(self.decoding.tokens.numel())

    @property
    def tokens_per_second(self) -> float:
        return self.decoding.tokens_per_second

    @property
    def speedup(self) -> float | None:
        if self.baseline is None or self.baseline.tokens_per_second == 0:
            return None
        return self.decoding.tokens_per_second / self.baseline.tokens_per_second


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T); with `chat`, the prompt is one user turn of `encode_chat` (template or its fallback)."""
    if not prompt:
        raise RadError("The prompt is empty; pass some text with --prompt.")
    if chat:
        return torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": prompt}], True)], dtype=torch.long)
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate_text(
    loaded: LoadedModel,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    skip_layers: list[int] | None = None,
    draft: DraftConfig | None = None,
    sampling: SamplingConfig | None = None,
    compare: bool = False,
) -> GenerationResult:
    """Continue `prompt`. With `skip_layers`, decode self-speculatively (draft = those attention layers
    skipped); with `compare`, also decode plainly to report the speed-up (greedy output is identical)."""
    tokenizer = loaded.tokenizer
    input_ids = encode_prompt(tokenizer, prompt, chat)
    eos = eos_token_ids(tokenizer, loaded.model)
    kwargs = dict(draft=draft, sampling=sampling, eos_token_id=eos)
    decoding = speculative_generate(loaded.model, input_ids, skip_layers, max_new_tokens, **kwargs)
    baseline = None
    if compare and skip_layers is not None:
        baseline = speculative_generate(loaded.model, input_ids, None, max_new_tokens, **kwargs)
    return GenerationResult(
        text=tokenizer.decode(decoding.tokens, skip_special_tokens=True),
        prompt_tokens=int(input_ids.shape[1]),
        decoding=decoding,
        baseline=baseline,
    )
