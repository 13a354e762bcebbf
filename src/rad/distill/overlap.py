"""No evaluation item in the distillation data: a record that contains a CRUXEval function, a GSM8K test
question or a HumanEval problem (its prompt, or its reference solution) is refused, whatever source it came from.

Matching is on token sequences (words and single punctuation marks, lower-cased), so re-indenting, re-wrapping
or a changed line ending does not hide a copy. The rule is *whole containment*: every token of the evaluation
item, in order and contiguous, inside one record. Shorter shared runs are not flagged on purpose: measured on the
real files, 20-token runs are shared by MBPP and CRUXEval (`for i in range ( len ( nums ) - 2 , - 1 , - 1 ) :`)
and by GSM8K train and test questions built on one template ("bought stamps at the post office ..."), which is
how those data sets are, not a leak.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from rad.data import find_rows
from rad.errors import RadError

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\w+|[^\w\s]")
ANCHOR = 8  # tokens looked up per position; every protected item is at least this long (shorter: matched whole)


def tokens(text: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(text.lower()))


@dataclass(frozen=True)
class Protected:
    """One evaluation item that must not appear in training data."""

    what: str  # "CRUXEval sample_12", "GSM8K test question 893"
    tokens: tuple[str, ...]


class ProtectedIndex:
    """Evaluation items indexed by their first `ANCHOR` tokens; `find` scans a text once."""

    def __init__(self, items: Iterable[Protected]):
        self.items = [item for item in items if item.tokens]
        self._by_anchor: dict[tuple[str, ...], list[Protected]] = {}
        for item in self.items:
            self._by_anchor.setdefault(item.tokens[:ANCHOR], []).append(item)
        self._lengths = sorted({min(len(item.tokens), ANCHOR) for item in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def find(self, text: str) -> Protected | None:
        """The first protected item wholly contained in `text`, else None."""
        toks = tokens(text)
        for start in range(len(toks)):
            for length in self._lengths:
                for item in self._by_anchor.get(toks[start:start + length], ()):
                    if toks[start:start + len(item.tokens)] == item.tokens:
                        return item
        return None


def evaluation_items(sources: tuple[str, ...], data_dir: str | None = None) -> tuple[list[Protected], list[str]]:
    """CRUXEval functions and GSM8K test questions from wherever `rad.data` finds them, and a note per set it
    could not find (its overlap is then unchecked: the evaluation cannot run on it either)."""
    items, missing = [], []
    rows, located = find_rows("cruxeval", data_dir, sources)
    if rows is None:
        missing.append("CRUXEval (" + "; ".join(located.tried) + ")")
    else:
        items += [Protected(f"CRUXEval {row['id']}", tokens(row["code"])) for row in rows]
    rows, located = find_rows("gsm8k_test", data_dir, sources)
    if rows is None:
        missing.append("GSM8K test (" + "; ".join(located.tried) + ")")
    else:
        items += [Protected(f"GSM8K test question {i}", tokens(row["question"])) for i, row in enumerate(rows)]
    rows, located = find_rows("humaneval", data_dir, sources)
    if rows is None:
        missing.append("HumanEval (" + "; ".join(located.tried) + ")")
    else:
        items += [Protected(f"HumanEval {row['task_id']} {part}", tokens(row[field])) for row in rows
                  for part, field in (("prompt", "prompt"), ("solution", "canonical_solution"))]
    return items, missing


@functools.lru_cache(maxsize=4)
def _default_index(sources: tuple[str, ...]) -> tuple[ProtectedIndex, tuple[str, ...]]:
    items, missing = evaluation_items(sources)
    return ProtectedIndex(items), tuple(missing)


def record_text(record: dict) -> str:
    """Every string a record holds (chat messages' contents too), joined: what could carry an item."""
    parts: list[str] = []

    def walk(value):
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(record)
    return "\n".join(parts)


def check_no_overlap(records: list[dict], source: str, sources: tuple[str, ...],
                     index: ProtectedIndex | None = None) -> None:
    """Refuse (RadError naming the record and the item) distillation records holding an evaluation item."""
    if index is None:
        index, missing = _default_index(tuple(sources))
        for note in missing:
            logger.warning("Distillation data not checked against %s: data not found.", note)
    for number, record in enumerate(records):
        hit = index.find(record_text(record))
        if hit is not None:
            preview = " ".join(hit.tokens[:12])
            raise RadError(f"Distillation record {number} of {source} contains {hit.what} ({preview} ...), which "
                           "rad evaluates on; remove it from the data.")
    logger.info("Distillation data %s: %d records, none contains one of %d evaluation items", source,
                len(records), len(index))
