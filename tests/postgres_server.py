"""A throwaway PostgreSQL server for the shared-study tests: a fresh cluster in a temporary folder, on a free
local port, stopped (and its folder removed) when the tests end.

It uses Debian's `postgresql` package (`make postgres-tools` installs it; CI sets RAD_REQUIRE_POSTGRES=1 so the
tests never skip there). PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def postgres_bin() -> Path | None:
    """The folder with initdb and pg_ctl (Debian keeps them out of PATH), or None without PostgreSQL."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def driver_available() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster that trusts local connections; yield the URL of its database `rad` (user `rad`)."""
    bindir = postgres_bin()
    assert bindir is not None, "PostgreSQL is not installed (make postgres-tools)"
    root = Path(tempfile.mkdtemp(prefix="rad-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    log = root / "server.log"

    def run(*args: str) -> None:
        done = subprocess.run([*run_as, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}"

    run(str(bindir / "initdb"), "-D", str(data), "-U", "rad", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    try:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "rad", "rad")
        yield f"postgresql://rad@127.0.0.1:{port}/rad"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
