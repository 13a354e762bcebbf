"""Statistics for accuracies: Wilson's interval (stays inside [0, 1], behaves at 0/n and n/n) and the exact
McNemar test for two models scored on the same items (paired, so it sees differences an interval overlap hides)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from rad.errors import RadError

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval for `correct` successes in `total` trials ((0, 1) when total is 0)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if correct <= 0 else max(0.0, centre - half)
    high = 1.0 if correct >= total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class McNemarResult:
    """The exact McNemar test of models A and B on paired items: `b` items only A got right, `c` only B.

    `p_value` is two-sided (the exact binomial test of b against Bin(b + c, 1/2)); `better` is "a", "b" or
    "tie" by the discordant counts alone, whatever the p-value."""

    b: int
    c: int
    n_discordant: int
    p_value: float
    better: str
    n_items: int | None = None  # paired items in all (concordant too), when known

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def mcnemar_exact(b: int, c: int, n_items: int | None = None) -> McNemarResult:
    """Two-sided exact McNemar: p = min(1, 2 P[X <= min(b, c)]) with X ~ Bin(b + c, 1/2); p = 1 with no
    discordant pair. Integer arithmetic (math.comb, then one rounding), exact for any n."""
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RadError(f"McNemar's {name} must be a count of items (a whole number >= 0), got {value!r}.")
    n = b + c
    if n == 0:
        p = 1.0
    else:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
        p = float(min(Fraction(1), Fraction(2 * tail, 2**n)))
    better = "a" if b > c else "b" if c > b else "tie"
    return McNemarResult(b=b, c=c, n_discordant=n, p_value=p, better=better, n_items=n_items)


def pair_outcomes(items_a: Iterable[Mapping] | Mapping[str, Mapping],
                  items_b: Iterable[Mapping] | Mapping[str, Mapping],
                  names: tuple[str, str] = ("A", "B")) -> list[tuple[str, bool, bool]]:
    """(item id, A correct, B correct) for every item, paired by id: the records are what `rad eval` writes
    to `<task>.jsonl` (`id`, `correct`, ...), as a list or as `read_items`' id -> record mapping. Two result
    sets over different items cannot be paired, so that is refused rather than silently intersected."""
    a, b = _by_id(items_a, names[0]), _by_id(items_b, names[1])
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        detail = "; ".join(f"{len(ids)} only in {name} (e.g. {ids[0]})"
                           for name, ids in ((names[0], only_a), (names[1], only_b)) if ids)
        raise RadError(f"{names[0]} and {names[1]} were scored on different items ({detail}); evaluate both "
                       "with the same tasks and --limit before a paired test.")
    return [(item_id, a[item_id], b[item_id]) for item_id in sorted(a)]


def mcnemar_items(items_a, items_b, names: tuple[str, str] = ("A", "B")) -> McNemarResult:
    """The exact McNemar test of two models' per-item results on the same items (see `pair_outcomes`)."""
    pairs = pair_outcomes(items_a, items_b, names)
    b = sum(1 for _, ok_a, ok_b in pairs if ok_a and not ok_b)
    c = sum(1 for _, ok_a, ok_b in pairs if ok_b and not ok_a)
    return mcnemar_exact(b, c, n_items=len(pairs))


def _by_id(items, name: str) -> dict[str, bool]:
    records = list(items.values()) if isinstance(items, Mapping) else list(items)
    out: dict[str, bool] = {}
    for record in records:
        if not isinstance(record, Mapping) or "id" not in record or "correct" not in record:
            raise RadError(f"{name}'s per-item results need an 'id' and a 'correct' per record (what rad eval "
                           f"writes to <task>.jsonl); got {str(record)[:80]!r}.")
        if record["id"] in out:
            raise RadError(f"{name}'s per-item results hold item {record['id']!r} twice; re-run rad eval into a "
                           "fresh --out.")
        out[record["id"]] = bool(record["correct"])
    return out
