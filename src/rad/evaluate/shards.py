"""Evaluation split across processes: shard i of n scores the items whose position is i modulo n.

Each shard appends its per-item records to `<task>.shard-i-of-n.jsonl` beside the task's `<task>.jsonl`. The
shard that finds, after its own items, that all shards together cover every item merges them into
`<task>.jsonl` in item order (the file one process writes) and removes the shard files: a later `rad eval`, sharded
or not, resumes from it. No collective communication is needed, so shards may be processes of one
`accelerate launch` (the shard is then the process's RANK of WORLD_SIZE) or independent jobs (`--shard i/n`, for
instance a SLURM array), started in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rad.errors import RadError
from rad.utils.atomic import atomic_write_text
from rad.utils.locks import file_lock

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise RadError(f"--shard {self.index}/{self.count} does not exist: give i/n with n at least 1 and "
                           f"0 <= i < n (shard 0/2 and shard 1/2 split the items in two).")

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SPEC.match(text or "")
        if not match:
            raise RadError(f"--shard takes i/n (this process's shard i of n, counted from 0), got {text!r}.")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def from_launcher(cls, environ: dict | None = None) -> Shard:
        """Shard RANK of WORLD_SIZE under `accelerate launch` / torchrun; the whole set otherwise."""
        environ = os.environ if environ is None else environ
        try:
            rank, world = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise RadError("RANK and WORLD_SIZE must be whole numbers (they are set by accelerate launch or "
                           "torchrun); unset them, or pass --shard i/n.") from None
        return cls(rank, world)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def path(self, items_path: Path) -> Path:
        """This shard's per-item file beside `items_path` (`gsm8k.jsonl` -> `gsm8k.shard-0-of-2.jsonl`)."""
        return items_path.with_name(f"{items_path.stem}.shard-{self.index}-of-{self.count}{items_path.suffix}")

    def all_paths(self, items_path: Path) -> list[Path]:
        return [Shard(i, self.count).path(items_path) for i in range(self.count)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@contextlib.contextmanager
def merge_lock(items_path: Path) -> Iterator[None]:
    """Held while a shard merges a task's files: two shards finishing together do not both rewrite it."""
    with file_lock(items_path.with_name(f".{items_path.name}.merge-lock")):
        yield


def merge_if_complete(items_path: Path, shard: Shard, wanted: list[str], read_items) -> dict[str, dict] | None:
    """Every record of the task, merged into `items_path` in item order, once the shards cover every `wanted` item
    id; None while some shard is still working. `read_items(path)` reads one per-item file."""
    with merge_lock(items_path):
        records = read_items(items_path)
        for path in shard.all_paths(items_path):
            records.update(read_items(path))
        if any(item_id not in records for item_id in wanted):
            return None
        ordered = sorted(records.values(), key=lambda r: (r.get("index", 0), str(r["id"])))
        atomic_write_text(items_path, "".join(json.dumps(r) + "\n" for r in ordered))
        for path in shard.all_paths(items_path):
            path.unlink(missing_ok=True)  # each holds only records now in items_path
        return records
