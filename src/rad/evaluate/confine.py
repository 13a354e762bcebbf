"""What the kernel enforces around one sandboxed child, beyond bubblewrap's namespaces and the rlimits:

- **A reaper.** A small process of its own session, started before the child, that blocks on a pipe whose only
  writer is rad. When rad closes it (the child is done) or dies (SIGTERM, SIGKILL, the OOM killer: the kernel
  closes a dead process's files), the read returns and the reaper SIGKILLs the child and every descendant (and,
  with a cgroup, every process in it), then removes the cgroup. So nothing of the sandbox outlives rad by more
  than the reaper's reaction time (milliseconds), and this does not rely on a parent-death signal, which the
  kernel clears when the sandbox changes its user id.
- **A memory and process cgroup**, where the host lets rad make one (cgroup v2 with the memory and pids
  controllers delegated to rad's own cgroup, or cgroup v1's memory and pids hierarchies, writable by root): every
  page the sandbox causes is charged to it (anonymous memory, memfd and tmpfs pages, SysV shared memory, page
  cache), which RLIMIT_AS does not see, and `pids.max` bounds its processes and threads. The child joins it
  before bubblewrap starts (a tiny `sh` writes its own pid, then execs). Where no cgroup can be made, the sandbox
  runs with the rlimits only and `CgroupLimits.available()` says why (docs/sandbox.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_COUNTER = itertools.count()

# The reaper: argv = [child pid, cgroup folder, ...]. It holds a pidfd on the child from the start, so a recycled
# pid is never signalled; descendants are read from /proc when it acts (processes inside bubblewrap's pid namespace,
# daemonised or not, stay descendants of its init).
_REAPER = r'''
import os, signal, sys, time
root, groups = int(sys.argv[1]), sys.argv[2:]
try:
    handle = os.pidfd_open(root)
except OSError:
    handle = None
while True:
    try:
        if not os.read(0, 1 << 12):
            break
    except InterruptedError:
        continue
    except OSError:
        break
def processes():  # {pid: (parent, state)} of every process now
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as fh:
                    stat = fh.read()
                fields = stat[stat.rindex(b")") + 2:].split()
                found[int(name)] = (int(fields[1]), fields[0])
            except (OSError, ValueError, IndexError):
                pass
    return found
def members():
    found = set()
    for group in groups:
        try:
            with open(os.path.join(group, "cgroup.procs")) as fh:
                found.update(int(line) for line in fh if line.strip())
        except (OSError, ValueError):
            pass
    return found
known = {root}
for _ in range(500):
    table = processes()
    children = {}
    for pid, (parent, _state) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = list(known)
    while todo:  # every descendant of anything known, found before this round kills any of them
        for child in children.get(todo.pop(), ()):
            if child not in known:
                known.add(child)
                todo.append(child)
    known |= members()
    known.discard(os.getpid())
    alive = [pid for pid in known if pid in table and table[pid][1] != b"Z"]
    if not alive:
        break
    for pid in alive:
        try:
            if pid == root and handle is not None:
                signal.pidfd_send_signal(handle, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.005)
for group in groups:
    for _ in range(1000):  # up to 10 s: a loaded kernel can take a while to let go of the last (zombie) member
        try:
            os.rmdir(group)
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.01)
'''


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int  # every page the sandbox causes, all its processes together
    max_pids: int  # processes and threads

    @staticmethod
    def available() -> str | None:
        """None where rad can make a memory + pids cgroup here, else why not (one sentence)."""
        try:
            folders = _make_groups(f"rad-probe-{os.getpid()}-{next(_COUNTER)}")
        except OSError as err:
            return f"no cgroup could be made ({err.strerror or err})"
        if folders is None:
            return "neither a delegated cgroup v2 with memory and pids nor writable cgroup v1 hierarchies exist"
        for folder in folders:
            with contextlib.suppress(OSError):
                folder.rmdir()
        return None


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path in the v1 hierarchy of `controller`, or in the v2 one (controller None)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
                return path
    return None


def _make_groups(name: str) -> list[Path] | None:
    """Make the cgroup folders (v2: one; v1: memory and pids); None where neither kind can be made."""
    if (CGROUP_ROOT / "cgroup.controllers").is_file():  # pure v2
        own = _own_cgroup(None)
        if own is None:
            return None
        parent = CGROUP_ROOT / own.lstrip("/")
        enabled = (parent / "cgroup.subtree_control").read_text().split() if (
            parent / "cgroup.subtree_control").is_file() else []
        if not {"memory", "pids"} <= set(enabled):
            return None
        folder = parent / name
        folder.mkdir()
        return [folder]
    made = []
    for controller in ("memory", "pids"):
        own = _own_cgroup(controller)
        base = CGROUP_ROOT / controller
        if own is None or not base.is_dir():
            for folder in made:
                folder.rmdir()
            return None
        folder = base / own.lstrip("/") / name
        try:
            folder.mkdir()
        except OSError:
            for other in made:
                other.rmdir()
            raise
        made.append(folder)
    return made


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


def _limit(folders: list[Path], limits: CgroupLimits) -> bool:
    """Set the limits; False (and nothing enforced) where the files refuse them."""
    if len(folders) == 1:  # v2
        folder = folders[0]
        return (_write(folder / "memory.max", str(limits.memory_bytes))
                and _write(folder / "pids.max", str(limits.max_pids))
                and (_write(folder / "memory.swap.max", "0") or not (folder / "memory.swap.max").exists()))
    memory, pids = folders
    ok = _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
    if (memory / "memory.memsw.limit_in_bytes").exists():  # swap counted too, where the kernel accounts it
        ok = ok and _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
    return ok and _write(pids / "pids.max", str(limits.max_pids))


@dataclass
class Confinement:
    """One child's cgroup folders (empty where none could be made) and its reaper's pipe."""

    folders: list[Path]
    reaper: subprocess.Popen | None = None
    _pipe: int | None = None

    def wrap(self, command: list[str]) -> list[str]:
        """`command` started inside the cgroup: a shell writes its pid into each cgroup, then execs."""
        if not self.folders:
            return command
        script = 'for g in "$@"; do [ "$g" = -- ] && break; echo $$ > "$g/cgroup.procs" || exit 125; shift; done; ' \
                 'shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *map(str, self.folders), "--", *command]

    def watch(self, child_pid: int) -> None:
        """Start the reaper for `child_pid` (right after the child is started)."""
        read, write = os.pipe()
        try:
            self.reaper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, str(child_pid),
                                            *map(str, self.folders)], stdin=read, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(read)
        os.set_inheritable(write, False)
        self._pipe = write

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the sandbox for memory (read before `release`)."""
        for folder in self.folders:
            for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                with contextlib.suppress(OSError, ValueError):
                    for line in (folder / name).read_text().splitlines():
                        field, value = line.split()
                        if field == key and int(value) > 0:
                            return True
        return False

    def release(self, timeout: float = 10.0) -> None:
        """Kill everything of the sandbox now (the reaper does it and removes the cgroup) and wait for it."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self.reaper is not None:
            try:
                self.reaper.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("The sandbox reaper (pid %d) did not finish in %.0f s", self.reaper.pid, timeout)


@contextlib.contextmanager
def confinement(limits: CgroupLimits | None) -> Iterator[Confinement]:
    """A cgroup with `limits` (where one can be made) and, once `watch`ed, a reaper; released on exit."""
    folders: list[Path] = []
    if limits is not None:
        try:
            folders = _make_groups(f"rad-sandbox-{os.getpid()}-{next(_COUNTER)}-{time.monotonic_ns()}") or []
        except OSError as err:
            logger.debug("No cgroup for the sandbox: %s", err)
        if folders and not _limit(folders, limits):
            for folder in folders:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            folders = []
    confined = Confinement(folders)
    try:
        yield confined
    finally:
        confined.release()
        for folder in confined.folders if confined.reaper is None else ():
            with contextlib.suppress(OSError):
                folder.rmdir()
