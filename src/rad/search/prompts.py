"""Search prompts: a built-in offline set, a user file (text or jsonl), passkey haystacks (`--recall LENGTH`), and
their token ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rad.errors import RadError
from rad.haystack import search_haystacks
from rad.models.tokens import encode_chat

# Short, varied chat requests written for this project: explanation, advice, writing, lists, code,
# translation, summarising. None is a math word problem or a code-execution puzzle, so the search never
# sees the evaluation sets (GSM8K test, CRUXEval).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain in two sentences why leaves change colour in autumn.",
    "Give me three tips for keeping a houseplant alive.",
    "Write a haiku about a train station at night.",
    "What is the difference between weather and climate?",
    "Suggest a name for a bakery that only sells bread.",
    "Write a Python function that reverses the words in a sentence.",
    "Translate 'Where is the library?' into French and Spanish.",
    "Describe how a bicycle's gears make climbing a hill easier.",
    "List four things to pack for a weekend hiking trip.",
    "Write a polite email declining a meeting invitation.",
    "Why do cats purr? Answer briefly.",
    "Summarise the plot of Little Red Riding Hood in three sentences.",
    "What does a compiler do, in plain words?",
    "Give two arguments for and two against working from home.",
    "Write the opening line of a mystery novel set in a lighthouse.",
    "How do I make a simple vinaigrette salad dressing?",
)


MIN_RECALL_LENGTH = 256  # a haystack needs room for the introduction, key and question around some filler
MAX_PROMPT_FILE_BYTES = 1 << 20
MAX_PROMPT_CHARS = 32_000


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or jsonl objects with a "prompt" field (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise RadError(f"Prompt file {path} does not exist.")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise RadError(f"Prompt file {path} is {size / 2**20:.1f} MiB; search prompts are a few short chats (at most "
                       f"{MAX_PROMPT_FILE_BYTES >> 20} MiB in all): give fewer or shorter prompts.")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise RadError(f"Prompt file {path} is not UTF-8 text.") from None
    lines = [line for line in lines if line]
    if not lines:
        raise RadError(f"Prompt file {path} has no prompts; write one prompt per line (or jsonl with \"prompt\").")
    prompts = _read_jsonl(path, lines) if path.suffix == ".jsonl" or all(line.startswith("{") for line in lines) \
        else lines
    for number, prompt in enumerate(prompts, start=1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise RadError(f"{path}, prompt {number}: {len(prompt):,} characters; a search prompt is a short chat "
                           f"(at most {MAX_PROMPT_CHARS:,} characters).")
    return prompts


def _read_jsonl(path: Path, lines: list[str]) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RadError(f"{path}, prompt {number}: not valid JSON; write one JSON object per line.") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise RadError(f"{path}, prompt {number}: needs a non-empty string field \"prompt\".")
        prompts.append(prompt.strip())
    return prompts


def check_prompts_fit(prompts: list[torch.Tensor], new_tokens: int, positions: int | None, source: str) -> None:
    """Every prompt plus the tokens the search generates (and drafts) fits the model's positions."""
    if not isinstance(positions, int):
        return
    longest = max(int(ids.shape[-1]) for ids in prompts)
    if longest + new_tokens > positions:
        raise RadError(f"The longest search prompt is {longest} tokens; with {new_tokens} generated and drafted tokens "
                       f"it exceeds {source}'s {positions} positions: shorten the prompts or lower --max-new-tokens.")


def encode_prompts(tokenizer, prompts: list[str], chat: bool = True) -> list[torch.Tensor]:
    """Token ids (1, T) per prompt; with `chat`, each is one user turn of `encode_chat` (template or fallback)."""
    if not prompts:
        raise RadError("There are no search prompts; give a prompt file with at least one prompt.")
    if tokenizer is None:
        raise RadError("The model has no tokenizer; pass tokenised prompts (SearchConfig.prompt_ids) instead.")
    if not chat:
        return [tokenizer(prompt, return_tensors="pt").input_ids for prompt in prompts]
    return [torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": p}], True)], dtype=torch.long)
            for p in prompts]


def ids_from_lists(prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise RadError("Every tokenised search prompt needs at least one token, and there must be one or more.")
    return [torch.tensor([list(map(int, ids))], dtype=torch.long) for ids in prompt_ids]


def prompts_digest(encoded: list[torch.Tensor]) -> str:
    """A fingerprint of the token ids, so a resumed search can check it measures the same prompts."""
    h = hashlib.sha1()
    for ids in encoded:
        h.update(",".join(map(str, ids[0].tolist())).encode())
        h.update(b";")
    return h.hexdigest()[:16]


def recall_prompt_texts(tokenizer, length: int) -> list[str]:
    """The `--recall LENGTH` prompts: one passkey haystack of `length` tokens per depth (`rad.haystack`)."""
    if tokenizer is None:
        raise RadError("--recall fits its haystacks with the model's tokenizer, and this model has none.")
    return search_haystacks(length, lambda text: len(tokenizer(text, add_special_tokens=False).input_ids))
