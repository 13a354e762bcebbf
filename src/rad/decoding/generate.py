"""Text generation through transformers' `generate`, with timing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rad.errors import RadError
from rad.models.loading import LoadedModel


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T); with `chat`, the prompt is one user turn in the model's chat template."""
    if not prompt:
        raise RadError("The prompt is empty; pass some text with --prompt.")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RadError("This tokenizer has no chat template; drop --chat to use the raw prompt.")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_text(
    loaded: LoadedModel,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> GenerationResult:
    """Greedy (temperature 0) or sampled continuation of `prompt`."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    input_ids = encode_prompt(tokenizer, prompt, chat).to(device)
    sampling = temperature > 0
    generator_kwargs = {"do_sample": sampling}
    if sampling:
        torch.manual_seed(seed)
        generator_kwargs.update(temperature=temperature, top_p=top_p)
    start = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **generator_kwargs,
    )
    seconds = time.perf_counter() - start
    new = output[0, input_ids.shape[1] :]
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=input_ids.shape[1],
        new_tokens=int(new.numel()),
        seconds=seconds,
    )
