"""Loss against position on long real text: at which distance a model stops using its context.

The text is the running interpreter's own standard library source (a fixed, sorted list of pure-Python modules
every CPython ships; nobody here wrote it), tokenised and cut into windows of `length` tokens. For each window the
next-token loss at every position is computed from the final hidden states, the head applied in chunks (a 16k x
152k float32 logits tensor would be 10 GB); the curve is the mean over windows, then averaged in log-spaced
position buckets. A Transformer's loss keeps falling with position while its context helps; a hybrid whose
mixers forget shows where its curve flattens or rises above the teacher's.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from rad.errors import RadError

# Long, stable, pure-Python modules (the same list on every CPython 3.10+), read in this order.
STDLIB_FILES = ("argparse.py", "ast.py", "calendar.py", "configparser.py", "dataclasses.py", "datetime.py",
                "decimal.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "inspect.py", "ipaddress.py",
                "logging/__init__.py", "pathlib.py", "pickle.py", "pydoc.py", "shutil.py", "statistics.py",
                "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "typing.py", "zipfile.py")


def stdlib_text(min_chars: int) -> str:
    """The standard library files above, concatenated in order until `min_chars` characters (all of them at most)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for name in STDLIB_FILES:
        path = root / name
        if not path.is_file():
            path = root / name.replace(".py", "") / "__init__.py"
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(f"# {name}\n{text}")
            size += len(text)
        if size >= min_chars:
            break
    if not parts:
        raise RadError(f"No standard library source under {root}; the position loss needs the interpreter's .py files.")
    return "\n".join(parts)


def windows(tokenizer, length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` token ids, back to back from the start of the standard-library text."""
    need = length * count
    ids: list[int] = []
    chars = need * 4
    while len(ids) < need:
        text = stdlib_text(chars)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(text) < chars:  # every file read
            break
        chars *= 2
    if len(ids) < need:
        raise RadError(f"The standard-library text holds {len(ids)} tokens, fewer than {count} windows of {length}; "
                       "ask for fewer or shorter windows.")
    return torch.tensor(ids[:need]).view(count, length)


@torch.no_grad()
def position_losses(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token loss (nats) at positions 1..T-1 of each row of `ids` [N, T], averaged over rows: a [T - 1] float64
    tensor. One forward per row without a cache; the head runs on `chunk` positions at a time, its logits in at
    least float32."""
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    total = torch.zeros(ids.shape[1] - 1, dtype=torch.float64)
    for row in ids:
        row = row.to(device)[None]
        hidden = model.base_model(input_ids=row, use_cache=False).last_hidden_state[0, :-1]
        targets = row[0, 1:]
        for start in range(0, hidden.shape[0], chunk):
            logits = head(hidden[start : start + chunk])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
            loss = F.cross_entropy(logits, targets[start : start + chunk], reduction="none")
            total[start : start + chunk] += loss.double().cpu()
    return total / ids.shape[0]


def bucketed(losses: torch.Tensor, buckets: int = 24) -> list[dict]:
    """Mean loss in log-spaced position buckets [lo, hi): what the curve plots (`position` is the bucket's centre)."""
    n = losses.numel()
    edges = sorted({int(round(math.exp(math.log(n) * i / buckets))) for i in range(buckets + 1)} | {0, n})
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if hi > lo:
            out.append({"from": lo + 1, "to": hi, "position": (lo + hi + 1) / 2,
                        "loss": float(losses[lo:hi].mean())})
    return out


def plot_position_loss(curves: dict[str, list[dict]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for model, curve in curves.items():
        ax.plot([b["position"] for b in curve], [b["loss"] for b in curve], marker=".", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("Loss against position on CPython standard-library source", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
