"""Synthetic long-context texts: a five-digit pass key hidden at a depth of 0-100% of filler, asked for at the end
(Mohtashami & Jaggi 2023, "Landmark Attention", whose filler and key sentence this follows).

Two stages read them: evaluation's passkey task (`rad.evaluate.passkey`) and the search's recall prompts
(`search_haystacks`), which is why they live below both. Every text is a fixed function of (length, depth, key)
and the tokenizer that fits the filler to the length.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rad.errors import RadError

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorise it. I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
RAW_ANSWER = "\nThe pass key is"  # the completion form ends here


def passkey_of(length: int, depth: int, repeat: int) -> str:
    return str(random.Random(f"passkey-{length}-{depth}-{repeat}").randint(10000, 99999))


def haystack(length: int, depth: int, key: str, count) -> tuple[str, int]:
    """The user text of `length` tokens (by `count`, the tokenizer's length of a text) with the key at `depth`%
    of the filler, and its measured length."""
    fixed = count(INTRO + NEEDLE.format(key=key) + QUESTION)
    per_unit = count(FILLER * 8) / 8  # the filler's tokens per repetition, merges at the joins averaged in
    units = int((length - fixed) // per_unit)
    if units < 1:
        raise RadError(f"A passkey context of {length} tokens does not hold the key and question "
                       f"({fixed} tokens); ask for more.")
    for _ in range(4):  # the estimate is off by a few tokens: adjust down until it fits
        before = round(units * depth / 100)
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (units - before) + QUESTION
        tokens = count(text)
        if tokens <= length:
            return text, tokens
        units -= max(1, int((tokens - length) // per_unit) + 1)
    return text, tokens


SEARCH_DEPTHS = (0, 25, 50, 75, 100)


def search_haystacks(length: int, count: Callable[[str], int], depths: tuple[int, ...] = SEARCH_DEPTHS) -> list[str]:
    """The search's recall prompts: one haystack of `length` tokens per depth, with keys drawn apart from the
    evaluation's (its items use repeats 0, 1, ...; these use 1000 + i), so the search never sees an eval item."""
    return [haystack(length, depth, passkey_of(length, depth, 1000 + i), count)[0] for i, depth in enumerate(depths)]
