"""One writer per output folder: a second `rad distill` (align, eval, run, sweep, ablate) into the same `--out`
exits 2 naming the first, instead of interleaving logs and checkpoints with it.

The lock is an advisory `flock` on a hidden sibling file, `.NAME.rad-lock` beside the folder (not inside it: a
folder's contents are how rad recognises its own outputs, and atomic writers replace whole folders). The kernel
drops a `flock` when its process dies, however it dies (SIGKILL, the OOM killer), so a stale lock is never left
to take over: the next writer simply gets it. The file itself stays (removing it would race a third writer) and
holds who wrote last, for the refusal. Local file systems only: `flock` over NFS depends on the server.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from rad.errors import RadError

LOCK_SUFFIX = ".rad-lock"


def lock_path(folder: str | os.PathLike, part: str | None = None) -> Path:
    """The lock file of `folder`: a hidden sibling (`runs/.x.rad-lock` for `runs/x`); of one `part` of it, when
    processes write disjoint parts (`runs/.x.shard-0-of-2.rad-lock`)."""
    folder = Path(folder).expanduser().absolute()
    return folder.parent / f".{folder.name}{'.' + part if part else ''}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})")
    except (OSError, ValueError, KeyError, TypeError):  # written a moment later than the lock was taken
        return "another rad process"


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, command: str, part: str | None = None) -> Iterator[Path]:
    """Hold `folder`'s writer lock (or that of one `part` of it) for the block; a RadError (exit 2) naming the
    holder when another process has it. Does not wait: a second writer is a mistake to report, not a queue."""
    path = lock_path(folder, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RadError(f"{Path(folder)} is being written by {_holder(path)}; wait for it to finish, or give "
                           "another output folder.") from None
        info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path`, waited for and held for the block (the OS drops it if the process
    dies): for short critical sections between cooperating rad processes, not for refusing a second writer."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
