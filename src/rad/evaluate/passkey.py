"""Long-context recall: a five-digit pass key hidden at a depth of 0-100% in filler text, asked for at the end
(the texts: `rad.haystack`; the needle-in-a-haystack family). Exact match of the first number answered.
Synthetic: no data file; every item is a fixed function of (length, depth, repeat), the tokenizer fitting the
filler to the length.

A context length counts the tokens of the user's text (introduction, filler, key, question), not the chat
template's few tokens around it. Items run shortest length first, then depth, then repeat, so `--limit N` keeps the
short ones; give the lengths you want instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from rad.errors import RadError
from rad.haystack import FILLER, INTRO, NEEDLE, QUESTION, RAW_ANSWER


@dataclass(frozen=True)
class PasskeyConfig:
    """Which haystacks: context lengths in tokens, depths in percent of the filler, items per (length, depth)."""

    lengths: tuple[int, ...] = (1024, 4096, 8192, 16384)
    depths: tuple[int, ...] = (0, 25, 50, 75, 100)
    repeats: int = 1

    def __post_init__(self):
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 256 for n in self.lengths):
            raise RadError(f"Passkey context lengths must be whole numbers of at least 256 tokens, got "
                           f"{list(self.lengths)}.")
        if not self.depths or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 100
                                  for d in self.depths):
            raise RadError(f"Passkey depths are percentages from 0 to 100, got {list(self.depths)}.")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise RadError(f"Passkey repeats must be at least 1, got {self.repeats!r}.")

    def cells(self) -> list[tuple[int, int, int]]:
        return [(n, d, r) for n in sorted(set(self.lengths)) for d in sorted(set(self.depths))
                for r in range(self.repeats)]

    def fingerprint(self) -> str:
        """What the items are made of (settings and texts): the task's data identity for resume and pairing."""
        made_of = {**asdict(self), "texts": [INTRO, FILLER, NEEDLE, QUESTION, RAW_ANSWER]}
        return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()


def first_number(text: str) -> str:
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def recall_grid(records: list[dict]) -> dict[int, dict[int, list[int]]]:
    """{length: {depth: [correct, total]}} of a model's per-item passkey records (its `passkey.jsonl`)."""
    grid: dict[int, dict[int, list[int]]] = {}
    for r in records:
        cell = grid.setdefault(int(r["length"]), {}).setdefault(int(r["depth"]), [0, 0])
        cell[0] += bool(r["correct"])
        cell[1] += 1
    return {n: dict(sorted(d.items())) for n, d in sorted(grid.items())}


def plot_recall(grids: dict[str, dict[int, dict[int, list[int]]]], path) -> None:
    """One heat map per model: accuracy by context length (columns) and depth (rows), the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(grids))  # wrapped into rows of four: a sweep's many models stay readable
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 3.1 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.set_visible(False)
    for ax, (model, grid) in zip(axes.flat, grids.items(), strict=False):
        lengths = sorted(grid)
        depths = sorted({d for row in grid.values() for d in row})
        acc = [[grid[n][d][0] / grid[n][d][1] if d in grid[n] else float("nan") for n in lengths] for d in depths]
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                if d in grid[n]:
                    ax.text(j, i, f"{grid[n][d][0]}/{grid[n][d][1]}", ha="center", va="center", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("context (tokens)")
    for row in axes:
        row[0].set_ylabel("key depth")
    fig.suptitle("Passkey recall: exact match by context length and depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
