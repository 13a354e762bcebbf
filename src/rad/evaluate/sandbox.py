"""Run untrusted code (CRUXEval functions and model-written predictions) in a separate, limited process.

The child is a fresh `python -I` (isolated: no user site, no PYTHON* env vars) with an empty
environment, its own session (so a timeout kills everything it started), and rlimits on address
space, CPU time, file size and core dumps. Before the untrusted code runs, the harness replaces
socket creation, process spawning and file deletion with functions that raise. This is a guard
against accidents in benchmark code and model output, not a security boundary against an adversary
(the code could still reach `_posixsubprocess` or ctypes); run evaluations of unknown models in a
container if that matters.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from rad.errors import RadError

# Runs inside the child. Reads {"code", "input", "prediction", "nonce", "limits"} from stdin; prints one verdict.
_HARNESS = r'''
import json, os, sys

def _blocked(*args, **kwargs):
    raise PermissionError("blocked in the rad sandbox")

def _guard():
    import socket, _socket, subprocess, shutil, builtins
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
    subprocess.Popen = _blocked
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp",
                 "spawnv", "spawnve", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                 "replace", "truncate", "putenv", "chmod", "chown", "setuid", "setgid"):
        if hasattr(os, name):
            setattr(os, name, _blocked)
    shutil.rmtree = _blocked
    shutil.move = _blocked

request = json.loads(sys.stdin.read())
import resource
for _name, _value in request["limits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
out = sys.stdout
sys.stdout = sys.stderr = open(os.devnull, "w")
_guard()
verdict = {"nonce": request["nonce"]}
try:
    namespace = {"__name__": "__sandbox__"}
    exec(compile(request["code"], "<benchmark>", "exec"), namespace)
    actual = eval(compile("f(" + request["input"] + ")", "<input>", "eval"), namespace)
    expected = eval(compile(request["prediction"], "<prediction>", "eval"), namespace)
    verdict["status"] = "passed" if actual == expected else "failed"
except MemoryError:
    verdict["status"] = "memory"
except BaseException as err:
    verdict["status"] = "error"
    verdict["error"] = type(err).__name__ + ": " + str(err)[:200]
out.write(json.dumps(verdict) + "\n")
out.flush()
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits for untrusted code; CRUXEval functions need well under a second and a few MB."""

    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30  # address space; the interpreter itself needs ~30 MB
    max_file_bytes: int = 1 << 20


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | error | timeout | memory | crashed
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    """Set by the child itself before it reads any untrusted code (no preexec_fn: unsafe with threads)."""
    return {
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_CPU": int(limits.timeout_s) + 1,
        "RLIMIT_FSIZE": limits.max_file_bytes,
        "RLIMIT_CORE": 0,
    }


def check_output_prediction(
    code: str, inputs: str, prediction: str, limits: SandboxLimits | None = None
) -> SandboxResult:
    """Execute `f(inputs) == prediction` for CRUXEval code in a limited child process."""
    limits = limits or SandboxLimits()
    if sys.platform == "win32":
        raise RadError("The CRUXEval sandbox needs a POSIX system (resource limits); run it on Linux or macOS.")
    nonce = os.urandom(8).hex()
    request = json.dumps({"code": code, "input": inputs, "prediction": prediction, "nonce": nonce,
                          "limits": _rlimits(limits)})
    with tempfile.TemporaryDirectory(prefix="rad-sandbox-") as workdir:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir},
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(request.encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult("timeout", f"killed after {limits.timeout_s:g} s")
        finally:
            _kill_group(proc)  # anything the code left running in its session
    return _verdict(stdout.decode(errors="replace"), nonce, proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _verdict(stdout: str, nonce: str, returncode: int) -> SandboxResult:
    for line in reversed(stdout.strip().splitlines()):
        try:
            verdict = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(verdict, dict) and verdict.get("nonce") == nonce:
            return SandboxResult(verdict["status"], verdict.get("error", ""))
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult("timeout", f"CPU limit (signal {-returncode})")
    return SandboxResult("crashed", f"exit status {returncode}")
