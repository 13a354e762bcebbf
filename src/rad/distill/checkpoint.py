"""Training checkpoints: trainable weights, optimiser, scheduler, RNG and data position, written atomically.

Each checkpoint is a folder `step-NNNNNNN` made by `atomic_directory`, so a killed run leaves either a
complete folder or none; `state.json` lists a SHA-256 for every file, so a truncated or altered file is
detected on resume instead of silently training from garbage. `state.json` is a `CheckpointState`: it also
holds the settings that determine the run's result (`settings`), which `--resume` checks before continuing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rad.errors import RadError
from rad.outputs import write_failed
from rad.utils.artefacts import load_artefact
from rad.utils.atomic import atomic_directory
from rad.utils.identity import file_sha256

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
_NAME = re.compile(r"^step-(\d{7})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_LEGACY_SETTINGS = ("train", "steps", "global_batch")  # what state.json held at its top level before `settings`


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint's state.json holds: the step, a SHA-256 per file, the data position and the
    settings the run was made with (`rad.distill.models.resume_settings`), which a resume must match."""

    step: int
    files: dict[str, str]
    data_position: int | None = None
    train_sequences: int | None = None
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CheckpointState:
        settings = dict(data.get("settings") or {})
        if "settings" not in data:  # written before rad recorded the whole identity: what it did record
            settings = {k: data[k] for k in _LEGACY_SETTINGS if k in data}
            if "seed" in data:
                settings["data"] = {"seed": data["seed"]}
        return cls(step=int(data["step"]), files=dict(data["files"]), data_position=data.get("data_position"),
                   train_sequences=data.get("train_sequences"), settings=settings)

    @classmethod
    def load(cls, folder: Path) -> CheckpointState:
        return load_artefact(Path(folder) / STATE_FILE, cls.from_json, "a checkpoint's state",
                             "delete the checkpoint to resume from the one before",
                             missing=f"Checkpoint {folder} is partial or corrupt ({STATE_FILE} is missing)")


@dataclass
class Checkpoint:
    """A verified checkpoint's contents."""

    state: CheckpointState
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: list[dict]


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    rng_states: list[dict],
    *,
    settings: dict,
    data_position: int,
    train_sequences: int,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` atomically and delete all but the newest `keep`."""
    from safetensors import SafetensorError


    dest = root / f"step-{step:07d}"
    try:
        with atomic_directory(dest, overwrite=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / WEIGHTS_FILE))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler_state, tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            files = {p.name: file_sha256(p, memo=False) for p in sorted(tmp.iterdir())}
            state = CheckpointState(step=step, files=files, data_position=data_position,
                                    train_sequences=train_sequences, settings=settings)
            (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2))
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a full disk as a RuntimeError
        raise write_failed(dest, err, "free some space and run the same command again (with --resume for rad "
                           "distill): it continues from the newest complete checkpoint.") from err
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def checkpoint_bytes_still_needed(root: Path, per_checkpoint: int, *, steps: int, save_every: int, keep: int) -> int:
    """Disk the checkpoints of a run to `steps` still need beyond what `root` holds: the most that lie there at
    once (the newest `keep` plus the one being written; all of them for keep = 0), counting only the saves the
    run will make, so a 1-step run asks room for one checkpoint, not three."""
    existing = list_checkpoints(root)
    start = int(_NAME.match(existing[-1].name).group(1)) if existing else 0
    saves = 0
    if save_every and steps > start:
        saves = steps // save_every - start // save_every + (1 if steps % save_every else 0)
    at_once = len(existing) + saves if keep <= 0 else min(len(existing) + saves, keep + 1)
    on_disk = sum(f.stat().st_size for c in existing for f in c.iterdir() if f.is_file())
    return max(0, at_once * per_checkpoint - on_disk)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (temporary `.tmp-*` folders are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify_checkpoint(folder: Path) -> CheckpointState:
    """The checkpoint's state.json, after checking every file against its recorded SHA-256."""
    state = CheckpointState.load(folder)
    for name, digest in state.files.items():
        path = folder / name
        if not path.is_file():
            raise RadError(f"Checkpoint {folder} is partial: {name} is missing; delete it to resume from the one before.")
        if file_sha256(path, memo=False) != digest:
            raise RadError(f"Checkpoint {folder} is corrupt: {name} does not match its checksum; "
                           "delete it to resume from the one before.")
    missing = {WEIGHTS_FILE, "optimizer.pt", "scheduler.pt", "rng.pt"} - set(state.files)
    if missing:
        raise RadError(f"Checkpoint {folder} is partial: it lacks {sorted(missing)[0]}.")
    return state


def load_checkpoint(folder: Path, device: torch.device) -> Checkpoint:
    """Verified contents of a checkpoint folder."""
    state = verify_checkpoint(folder)
    return Checkpoint(
        state=state,
        weights=load_file(str(folder / WEIGHTS_FILE), device=str(device)),
        optimizer=torch.load(folder / "optimizer.pt", map_location=device, weights_only=False),
        scheduler=torch.load(folder / "scheduler.pt", weights_only=False),
        rng=torch.load(folder / "rng.pt", weights_only=False),
    )
