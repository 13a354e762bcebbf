"""Write folders and files so that a reader sees either nothing (or the old version) or the complete result.

The one place rad writes atomically: caches, checkpoints, reports and results all go through here, so a
killed or racing writer never leaves half a folder or a torn file.

Temporary siblings are named `.tmp-<name>.rad-<host>-<pid>-<token>` (`.old-...` for a folder being
replaced), so they say who wrote them. A killed writer leaves one behind (a model checkpoint's is
hundreds of MB); the next atomic write into the same folder removes every such leftover whose writer
provably died: same host, process gone. Anything else (other hosts, live writers, names rad does not
write) is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_TEMP_NAME = re.compile(r"^\.(?P<kind>tmp|old)-(?P<name>.+)\.rad-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host_tag() -> str:
    """A filename-safe tag of this machine (host names may hold any character)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(dest_name: str, kind: str = "tmp") -> str:
    """The name of a temporary sibling of `dest_name`, identifying this writer (host and pid)."""
    return f".{kind}-{dest_name}.rad-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep the folder
    return True


def stale_temps(folder: str | os.PathLike) -> list[Path]:
    """rad's temporary siblings in `folder` whose writer is provably dead (this host, process gone)."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    host = _host_tag()
    stale = []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            stale.append(entry)
    return stale


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the leftovers `stale_temps` finds (what killed writers left); returns what was removed."""
    removed = []
    for path in stale_temps(folder):
        match = _TEMP_NAME.match(path.name)
        original = path.parent / match["name"]
        try:
            if match["kind"] == "old" and not original.exists():
                # Killed between moving the old folder aside and moving the new one in: put the old one back.
                os.rename(path, original)
                logger.warning("Restored %s from %s (its replacement was interrupted)", original, path.name)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it first
        except OSError as err:
            logger.warning("Could not remove the leftover temporary %s: %s", path, err)
            continue
        removed.append(path)
    if removed:
        logger.info("Removed %d temporary leftover(s) of killed rad writers in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `dest` in one step.

    A killed process leaves only a `.tmp-*` sibling, never a partial `dest` (and the next write here
    removes it). When two processes race for the same `dest` without `overwrite`, the first rename wins
    and the loser's copy is discarded (both wrote the same thing). With `overwrite`, an existing `dest`
    is replaced: callers decide whether it may be (rad.outputs owns that check).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent)
    tmp = dest.parent / temp_name(dest.name)
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and dest.exists():
            trash = dest.parent / temp_name(dest.name, "old")
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
    remove_stale_temps(path.parent)
    tmp = path.parent / temp_name(path.name)
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
