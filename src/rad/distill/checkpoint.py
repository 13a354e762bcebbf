"""Training checkpoints: trainable weights, optimiser, scheduler, RNG and data position, written atomically.

Each checkpoint is a folder `step-NNNNNNN` made by `atomic_directory`, so a killed run leaves either a
complete folder or none; `state.json` lists a SHA-256 for every file, so a truncated or altered file is
detected on resume instead of silently training from garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rad.errors import RadError
from rad.utils.atomic import atomic_directory

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    rng_states: list[dict],
    meta: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` atomically and delete all but the newest `keep`."""
    dest = root / f"step-{step:07d}"
    with atomic_directory(dest, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / WEIGHTS_FILE))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (temporary `.tmp-*` folders are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify_checkpoint(folder: Path) -> dict:
    """The checkpoint's state.json, after checking every file against its recorded SHA-256."""
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise RadError(f"Checkpoint {folder} is partial or corrupt ({STATE_FILE} is missing or unreadable); "
                       "delete it to resume from the one before.") from None
    for name, digest in state.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise RadError(f"Checkpoint {folder} is partial: {name} is missing; delete it to resume from the one before.")
        if _sha256(path) != digest:
            raise RadError(f"Checkpoint {folder} is corrupt: {name} does not match its checksum; "
                           "delete it to resume from the one before.")
    missing = {WEIGHTS_FILE, "optimizer.pt", "scheduler.pt", "rng.pt"} - set(state.get("files", {}))
    if missing:
        raise RadError(f"Checkpoint {folder} is partial: it lacks {sorted(missing)[0]}.")
    return state


def load_checkpoint(folder: Path, device: torch.device) -> dict:
    """Verified contents of a checkpoint folder."""
    state = verify_checkpoint(folder)
    return {
        "state": state,
        "weights": load_file(str(folder / WEIGHTS_FILE), device=str(device)),
        "optimizer": torch.load(folder / "optimizer.pt", map_location=device, weights_only=False),
        "scheduler": torch.load(folder / "scheduler.pt", weights_only=False),
        "rng": torch.load(folder / "rng.pt", weights_only=False),
    }
