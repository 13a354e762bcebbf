"""What a result was made from, and the one check that refuses to continue it under other settings.

Every resumable stage saves, next to its partial result, the settings that determine that result (`rad eval`:
`<task>.meta.json`; `rad distill`: each checkpoint's `state.json`; `rad ablate`: each arm's `settings.json`;
`rad run`: `config.yaml`) and calls `check_same_settings` before continuing, so results made under different
settings are never mixed. Models and data are identified by content, not by path:

- `model_fingerprint`: SHA-256 over the files transformers reads (config, weights, tokenizer, generation
  config) of the folder that was actually loaded (for an alias or a .gguf file: rad's safetensors cache), so a
  re-made folder at the same path or a moved symlink is a different model, and a plain `cp -r` copy is the
  same one (file names and contents only; paths and mtimes are ignored). Measured: ~0.6 s for SmolLM2-135M's
  538 MB on this machine's CPU (SHA-NI, page cache warm); each file's digest is memoised per process on
  (path, size, mtime, inode). A model without a folder (hub id, built in memory) is hashed from its
  tensors, config and vocabulary.
- `tensor_sha256`: content identity of in-memory tensors (e.g. the tokenised distillation data).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from rad.errors import RadError

logger = logging.getLogger(__name__)

# What `from_pretrained` of a model and its tokenizer reads: these determine a model's answers.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.*",
)

_FILE_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike, memo: bool = True) -> str:
    """SHA-256 of a file's bytes; with `memo`, remembered per process while its size, mtime and inode stay the
    same (checksum verification passes memo=False: it must read the bytes)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if not memo or key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over (name, content digest) of the model files in `folder` (MODEL_FILE_PATTERNS)."""
    folder = Path(folder).resolve()
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS))
    if not files:
        raise RadError(f"{folder} holds no model files to identify; give a folder written by `save_pretrained`.")
    for p in files:
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def tensor_sha256(*tensors) -> str:
    """SHA-256 over the dtype, shape and bytes of each tensor, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(loaded) -> str:
    """The identity of what a `LoadedModel` holds: its folder's files, else its tensors, config and vocabulary."""
    if loaded.path is not None:
        return folder_fingerprint(loaded.path)
    model = loaded.model
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}\0{tensor_sha256(tensor)}\n".encode())
    vocab = loaded.tokenizer.get_vocab() if hasattr(loaded.tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items())).encode())
    h.update(str(getattr(loaded.tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def _flatten(data: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_settings(saved: Mapping, current: Mapping) -> tuple[list[str], list[str]]:
    """(settings that differ, settings the saved record lacks), as dotted names; nested dicts are compared
    key by key, so a setting added to rad later is reported as unrecorded, not as a change."""
    old, new = _flatten(saved), _flatten(current)
    differ = [k for k in new if k in old and old[k] != new[k]]
    unrecorded = [k for k in new if k not in old and not any(o.startswith(f"{k}.") for o in old)]
    # A dict that became a scalar or the other way round is a change too.
    differ += [k for k in old if k not in new and any(n.startswith(f"{k}.") for n in new)]
    return sorted(differ), sorted(unrecorded)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "…"


def show_change(name: str, old, new) -> str:
    """One changed setting as `check_same_settings` names it by default: "name old -> new", values shortened."""
    return f"{name} {_show(old)} -> {_show(new)}"


def describe_changes(saved: Mapping, current: Mapping, names: list[str],
                     describe: Callable[[str, object, object], str] = show_change) -> str:
    old, new = _flatten(saved), _flatten(current)
    return "; ".join(describe(k, old.get(k), new.get(k)) for k in names)


def check_same_settings(saved: Mapping, current: Mapping, *, what: str, advice: str,
                        describe: Callable[[str, object, object], str] = show_change) -> None:
    """Refuse (RadError) when `current` differs from the `saved` settings `what` was made with.

    One sentence names every changed setting with its old and new value (worded by `describe`, so a stage
    may keep the phrasing its users know), then `advice`. Settings the saved record lacks (made by an older
    rad) cannot be checked: a warning names them and the run continues. This is rad's one refuser: eval,
    distill, ablate, run and search all continue a saved result only through it.
    """
    differ, unrecorded = changed_settings(saved, current)
    if differ:
        raise RadError(f"{what} was made with other settings "
                       f"({describe_changes(saved, current, differ, describe)}); {advice}.")
    if unrecorded:
        logger.warning("%s does not record %s (made by an older rad); continuing without checking them.",
                       what, ", ".join(unrecorded))
