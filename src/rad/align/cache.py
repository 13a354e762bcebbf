"""An optional on-disk cache of the teacher's (input, target) pairs, so epochs after the first skip the teacher.

Epoch 1 computes the pairs of each step with the teacher and writes them as one safetensors shard per step
(bf16, written to a temporary name and renamed, so a killed run leaves whole shards or none); later epochs read
the shards in a reshuffled order. A bf16 teacher's pairs round-trip exactly, so with a bf16 pass a shard already
there (another run's with the same identity, or before a resume) also replaces the teacher in epoch 1. `align_cache.json` records what the pairs were made from (teacher, data,
layers, batch, precision); a cache made with anything else is refused, never silently reused. The space it
needs is computed and checked before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rad.align.teacher import LayerPairs
from rad.errors import RadError
from rad.outputs import check_apart, check_free_space, check_writable, write_failed
from rad.utils.atomic import atomic_write_json, temp_name
from rad.utils.identity import check_same_settings

logger = logging.getLogger(__name__)

MANIFEST = "align_cache.json"
CACHE_DTYPE = torch.bfloat16
_BYTES = 2  # bf16


def cache_bytes(steps_per_epoch: int, batch: int, seq_len: int, hidden: int, layers: int) -> int:
    """What a full cache takes on disk: per step, an input and a target [batch, seq_len, hidden] per layer (bf16),
    plus the attention mask (int64) and a small safetensors header."""
    per_step = 2 * layers * batch * seq_len * hidden * _BYTES + batch * seq_len * 8 + 4096
    return steps_per_epoch * per_step


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:07d}.safetensors"


def check_cache_folder(folder: str | os.PathLike, needed: int, inputs) -> Path:
    """Refuse a cache folder that cannot be written, overlaps an input, holds another program's files, or whose
    disk lacks room for what is still to be written (one sentence each); writes nothing."""
    folder = Path(folder).expanduser()
    check_writable(folder, "--cache")
    check_apart(folder, inputs, "--cache")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise RadError(f"--cache {folder} already holds files that rad align did not write (no {MANIFEST}); "
                       "choose a new or empty folder.")
    present = sum(p.stat().st_size for p in folder.glob("shard-*.safetensors")) if folder.is_dir() else 0
    check_free_space(folder, max(0, needed - present), "The alignment cache")
    return folder


@dataclass
class PairCache:
    """The cache folder of one alignment run (made by `open_cache`)."""

    folder: Path
    layers: list[int]

    def has(self, shard: int) -> bool:
        return shard_path(self.folder, shard).is_file()

    def write(self, shard: int, pairs: LayerPairs) -> None:
        """Store one step's pairs (bf16) under a temporary name, then rename: whole shards or none."""
        dest = shard_path(self.folder, shard)
        if dest.is_file():
            return
        tensors = {"attention_mask": pairs.attention_mask.detach().to("cpu", torch.int64).contiguous()}
        for layer in self.layers:
            tensors[f"input.{layer}"] = pairs.inputs[layer].detach().to("cpu", CACHE_DTYPE).contiguous()
            tensors[f"target.{layer}"] = pairs.targets[layer].detach().to("cpu", CACHE_DTYPE).contiguous()
        tmp = dest.with_name(temp_name(dest.name))
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, dest)
        except OSError as err:
            tmp.unlink(missing_ok=True)

            raise write_failed(dest, err, "free some space and run the same command again with --resume.") from err

    def read(self, shard: int, device: torch.device) -> LayerPairs:
        path = shard_path(self.folder, shard)
        try:
            tensors = load_file(str(path), device=str(device))
        except (OSError, RuntimeError, ValueError) as err:
            raise RadError(f"The cache shard {path} is missing or unreadable ({err}); delete the cache folder and "
                           "run again with --resume.") from None
        return LayerPairs(inputs={layer: tensors[f"input.{layer}"] for layer in self.layers},
                          targets={layer: tensors[f"target.{layer}"] for layer in self.layers},
                          attention_mask=tensors["attention_mask"])


def open_cache(folder: Path, layers: list[int], identity: dict) -> PairCache:
    """The cache in `folder` for pairs made under `identity`; refused when it was made under another."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            raise RadError(f"{manifest} is unreadable; delete the cache folder {folder} to rebuild it.") from None
        check_same_settings(saved, identity, what=f"The alignment cache {folder}",
                            advice="use another --cache folder, or delete this one to rebuild it")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest, identity)
    logger.info("Alignment cache: %s", folder)
    return PairCache(folder=folder, layers=list(layers))
