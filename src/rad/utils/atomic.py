"""Write folders and files so that a reader sees either nothing (or the old version) or the complete result.

The one place rad writes atomically: caches, checkpoints, reports and results all go through here, so a
killed or racing writer never leaves half a folder or a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `dest` in one step.

    A killed process leaves only a `.tmp-*` sibling, never a partial `dest`. When two processes race
    for the same `dest` without `overwrite`, the first rename wins and the loser's copy is discarded
    (both wrote the same thing). With `overwrite`, an existing `dest` is replaced.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and dest.exists():
            trash = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.exists():
                    raise
                # Another process finished first; its folder is complete, ours is redundant.
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file through a temporary sibling and one `os.replace`: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for text, encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, *, indent: int | None = 2, default=None) -> Path:
    """`data` as JSON (`indent`, `default` as in `json.dumps`) with a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")
