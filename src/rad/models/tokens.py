"""Chat-template encoding and end-of-sequence ids: the one place that decides both.

Generation, the search prompts, evaluation and distillation data all turn messages into token ids and
need to know which tokens end a turn (and which one pads a batch: `padding_token_id`). They used to do it four ways; a tokenizer without a chat template
made one raise, one warn and use the bare prompt, and one join the turns by newlines. Now every caller
goes through `render_chat` / `encode_chat` and `eos_token_ids`, so a model is prompted, evaluated and
distilled on the same token sequences.

The fallback without a chat template (documented once, here): the turns' contents in order, separated by
"\\n"; `add_generation_prompt` adds a final "\\n" (the next turn starts on a new line, as the assistant
header does in a template); a finished conversation (`add_generation_prompt=False`) ends with the EOS
token, as a template closes the last turn. The text is tokenised with the tokenizer's own special tokens
(BOS where it uses one), since there is no template to supply them. So the rendering of `messages[:-1]`
with a generation prompt is a prefix of the rendering of `messages`, with or without a template. A
warning is logged once per tokenizer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable

logger = logging.getLogger(__name__)

_warned: weakref.WeakSet = weakref.WeakSet()


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _warn_no_template(tokenizer) -> None:
    try:
        if tokenizer in _warned:
            return
        _warned.add(tokenizer)
    except TypeError:  # not weak-referenceable: warn every time
        pass
    logger.warning("The tokenizer has no chat template; messages are rendered as plain text (turns separated "
                   "by newlines).")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as text: the chat template's rendering, or the plain-text fallback (module docstring)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    _warn_no_template(tokenizer)
    text = "\n".join(str(m["content"]) for m in messages)
    if add_generation_prompt:
        return text + "\n"
    return text + (tokenizer.eos_token or "")


def chat_add_special_tokens(tokenizer) -> bool:
    """Whether rendered chat text is tokenised with special tokens: a template holds them itself."""
    return not has_chat_template(tokenizer)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of the conversation (`render_chat` tokenised; see the module docstring for no template)."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=chat_add_special_tokens(tokenizer)).input_ids)


def token_ids(value: int | Iterable[int] | None) -> list[int]:
    """An id, a list of ids or None (as configs store EOS) as a list of ints, deduplicated in order."""
    if value is None:
        return []
    values = [value] if isinstance(value, int) else value
    return list(dict.fromkeys(int(v) for v in values))


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS, then the model's generation-config EOS ids, deduplicated."""
    ids = token_ids(getattr(tokenizer, "eos_token_id", None))
    config = getattr(model, "generation_config", None)
    return token_ids([*ids, *token_ids(getattr(config, "eos_token_id", None))])


def padding_token_id(tokenizer, model=None) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else the first EOS (`eos_token_ids`),
    else 0. Padded positions are masked or dropped, so any id works; this decides it one way for
    evaluation batches, the search's reference generations and the distillation sequences."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = eos_token_ids(tokenizer, model)
    return eos[0] if eos else 0
