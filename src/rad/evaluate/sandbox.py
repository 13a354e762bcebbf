"""Score CRUXEval output predictions by running untrusted code in an isolated process (details: docs/sandbox.md).

Two things are untrusted: the benchmark function (data) and, above all, the model's prediction. The verdict is
computed here, in the parent, never by a child:

1. One sandboxed child runs the benchmark code and returns `repr(f(input))`. It never sees the prediction.
2. The prediction is parsed here as a literal (`ast.literal_eval` plus `nan`/`inf`/`set()`; nothing executes).
   Only when it is an expression (`[1] * 3`), a SEPARATE sandboxed child, never given the benchmark code or the
   data, evaluates it and returns its repr.
3. Both reprs are turned back into plain values with the same literal parser and compared here with Python `==`
   (CRUXEval's semantics: 1 == 1.0, a tuple is not a list). A value that is not a literal (a custom class with
   its own `__eq__`, a generator) cannot be compared and scores as an error.

Whatever a child prints is data, never a verdict: a reply that is not exactly one well-formed message, a child
that exits early, is killed or times out, scores as not passed.

Isolation (`isolation="bwrap"`, the default) is bubblewrap: every namespace unshared (user, pid, net, ipc, uts,
cgroup; no nested user namespaces), all capabilities dropped, uid 65534 inside and a non-root uid outside (so
RLIMIT_NPROC applies: the kernel exempts real root), a new session, a read-only view of only /usr, the /lib
links and the interpreter's prefix (its site-packages hidden), a small private tmpfs as the only writable place,
no /proc, an empty environment, a seccomp filter (libseccomp) refusing ptrace, keyctl, bpf, io_uring, mount
and friends, rlimits on memory, CPU, file size, core dumps and processes, and the whole
process tree SIGKILLed (pid-namespace teardown) on timeout. When the caller is root, a first, mount-only
bubblewrap makes the interpreter (which may live under a private /root) reachable, then `setpriv` drops to uid
65534 before the real sandbox starts. `isolation="none"` (opt-in, via `RAD_SANDBOX_ISOLATION=none`) keeps the
parent-side verdict and the rlimits but has no OS isolation; it is logged as a warning and recorded per item.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import socket as socket_module
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rad.errors import RadError
from rad.evaluate.confine import CgroupLimits, confinement

logger = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "none")
ISOLATION_ENV = "RAD_SANDBOX_ISOLATION"
BWRAP_ENV = "RAD_BWRAP"  # the bubblewrap binary, when not /usr/bin/bwrap or on PATH
SANDBOX_UID = 65534  # "nobody": the uid inside the sandbox, and outside it when the caller is root
_STATUSES = ("passed", "failed", "error", "timeout", "memory", "crashed")

# Runs inside the child as `python -I -S -c`. Reads one request from stdin ({"mode": "call", "code", "input"},
# {"mode": "expression", "expression"} or {"mode": "program", "code"}, plus "limits"), writes one JSON reply to the
# original stdout and exits.
# Everything the untrusted code prints goes to /dev/null (fds 0-2 are replaced before it runs).
_HARNESS = r'''
import json, os, resource, sys
request = json.loads(sys.stdin.buffer.read())
for _name, _value in request["limits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_reply_fd = os.dup(1)
_null = os.open(os.devnull, os.O_RDWR)
for _fd in (0, 1, 2):
    os.dup2(_null, _fd)
sys.stdin = sys.stdout = sys.stderr = open(os.devnull, "r+")
_dumps, _write, _exit = json.dumps, os.write, os._exit

def _run():
    namespace = {"__name__": "__sandbox__"}
    if request["mode"] == "call":
        exec(compile(request["code"], "<benchmark>", "exec"), namespace)
        value = eval(compile("f(" + request["input"] + ")", "<input>", "eval"), namespace)
    elif request["mode"] == "program":  # a completion followed by its tests: passing is running to the end
        exec(compile(request["code"], "<program>", "exec"), namespace)
        value = None
    else:
        value = eval(compile(request["expression"], "<prediction>", "eval"), namespace)
    return repr(value)

try:
    reply = {"status": "ok", "repr": _run()}
except MemoryError:
    reply = {"status": "memory"}
except BaseException as err:
    try:
        reply = {"status": "error", "error": (type(err).__name__ + ": " + str(err))[:300]}
    except BaseException:
        reply = {"status": "error", "error": "an exception that cannot be printed"}
data = _dumps(reply).encode()
while data:
    data = data[_write(_reply_fd, data):]
_exit(0)
'''


def _default_isolation() -> str:
    return os.environ.get(ISOLATION_ENV, "bwrap")


MAX_TIMEOUT_S = 3600.0
MAX_OPEN_FILES = 64
CGROUP_HEADROOM_BYTES = 256 << 20  # one sandboxed check; CRUXEval's take well under a second


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits for untrusted code; CRUXEval functions need well under a second and a few MB."""

    timeout_s: float = 5.0  # wall clock for one child, start-up included
    memory_bytes: int = 1 << 30  # address space per process; the interpreter itself needs ~30 MB
    max_file_bytes: int = 1 << 20
    max_processes: int = 8  # RLIMIT_NPROC inside the sandbox (the harness and bwrap's init count)
    scratch_bytes: int = 16 << 20  # size of the private tmpfs at /tmp, the only writable place
    max_reply_bytes: int = 1 << 20  # a longer reply (an enormous repr) is an error, never read whole
    isolation: str = field(default_factory=_default_isolation)  # "bwrap", or "none" (explicit opt-in, weaker)

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise RadError(f"Unknown sandbox isolation {self.isolation!r} (from {ISOLATION_ENV} or the settings); "
                           f"choose {' or '.join(ISOLATIONS)}.")
        # `not 0 < t <= max` also refuses NaN; inf and 1e300 would crash the scorer (select, math.ceil) after generation
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise RadError(f"--exec-timeout must be a number of seconds in (0, {MAX_TIMEOUT_S}], got {self.timeout_s}; "
                           "a benchmark's check takes seconds.")
        if min(self.memory_bytes, self.max_file_bytes, self.scratch_bytes, self.max_reply_bytes,
               self.max_processes) < 1:
            raise RadError("Sandbox limits must be positive; check the sandbox settings.")


@dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | error | timeout | memory | crashed
    detail: str = ""
    isolation: str = "bwrap"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- values: literals only, parsed without executing anything ------------------------------------------------


class _NotALiteral(ValueError):
    pass


class _Specials(ast.NodeTransformer):
    """What `repr` writes for values that `ast.literal_eval` does not accept: nan, inf, the empty set."""

    def visit_Name(self, node):
        if node.id in ("nan", "inf"):
            return ast.copy_location(ast.Constant(float(node.id)), node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "set" and not node.args and not node.keywords:
            return ast.copy_location(ast.Set(elts=[]), node)
        return node


def _literal_from_tree(tree: ast.Expression):
    try:
        return ast.literal_eval(_Specials().visit(tree))
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as err:
        raise _NotALiteral(str(err)) from None


def _literal(text: str):
    """The value a repr stands for, or _NotALiteral; never runs code."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise _NotALiteral(str(err)) from None
    return _literal_from_tree(tree)


def _equal(actual, expected) -> bool:
    """Python `==` on two plain literal values (no user-defined __eq__ can be reached)."""
    try:
        return bool(actual == expected)
    except (RecursionError, MemoryError):
        return False


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- the public check ----------------------------------------------------------------------------------------


def check_output_prediction(
    code: str, inputs: str, prediction: str, limits: SandboxLimits | None = None
) -> SandboxResult:
    """Is `f(inputs) == prediction` for CRUXEval code `code`? Decided here from two isolated children's reprs."""
    limits = limits or SandboxLimits()
    isolation = limits.isolation
    try:
        prediction_tree = ast.parse(prediction.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return SandboxResult("error", f"{type(err).__name__} in the prediction: {_short(str(err))}", isolation)

    actual = _run_child({"mode": "call", "code": code, "input": inputs}, limits)
    if actual.status != "ok":
        return SandboxResult(actual.status, "f(input): " + actual.detail, isolation)
    try:
        actual_value = _literal(actual.detail)
    except _NotALiteral:
        return SandboxResult("error", f"f(input) returned a value that is not a literal: {_short(actual.detail)}",
                             isolation)

    try:
        expected_value = _literal_from_tree(prediction_tree)
    except _NotALiteral:  # an expression such as [1] * 3: evaluated apart from the benchmark code
        expected = _run_child({"mode": "expression", "expression": prediction.strip()}, limits)
        if expected.status != "ok":
            return SandboxResult(expected.status, "prediction: " + expected.detail, isolation)
        try:
            expected_value = _literal(expected.detail)
        except _NotALiteral:
            return SandboxResult("error", "the prediction's value is not a literal: " + _short(expected.detail),
                                 isolation)

    if _equal(actual_value, expected_value):
        return SandboxResult("passed", "", isolation)
    return SandboxResult("failed", "f(input) returned " + _short(actual.detail), isolation)


def check_program(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Does `program` (a HumanEval completion followed by its tests and `check(entry_point)`) run to its end in the
    sandbox? An AssertionError is `failed`; any other exception `error`; timeouts and memory as for CRUXEval.

    Unlike CRUXEval's verdict, this one rests on the child: the tests must call the untrusted function in its own
    process, so code written to game the harness (a well-formed reply written on its channel, then exit) could fake
    a pass; an early exit without one is `crashed`. Greedy completions of a benchmark do not do that; treat HumanEval
    scores of adversarial code as unverified (docs/sandbox.md)."""
    limits = limits or SandboxLimits()
    reply = _run_child({"mode": "program", "code": program}, limits)
    if reply.status == "ok":
        return SandboxResult("passed", "", limits.isolation)
    if reply.status == "error" and reply.detail.startswith("AssertionError"):
        return SandboxResult("failed", _short(reply.detail), limits.isolation)
    return SandboxResult(reply.status, _short(reply.detail), limits.isolation)


# --- availability ---------------------------------------------------------------------------------------------


def sandbox_problem(isolation: str = "bwrap") -> str | None:
    """Why the sandbox cannot run here (one sentence saying what to do), or None when it works."""
    if isolation == "none":
        return None
    return _probe_bwrap(_bwrap())


@functools.lru_cache(maxsize=4)
def _probe_bwrap(bwrap: str | None) -> str | None:
    """Runs one tiny job through the real sandbox once per process (~0.1 s): an installed but unusable
    bubblewrap (no user namespaces in a container, a locked-down kernel) is found before any model work."""
    if not sys.platform.startswith("linux"):
        return (f"The CRUXEval sandbox needs Linux with bubblewrap (this is {sys.platform}); run the evaluation on "
                f"Linux, or set {ISOLATION_ENV}=none to run untrusted code without isolation (not recommended).")
    if bwrap is None:
        return ("The CRUXEval sandbox needs bubblewrap, which is not installed; install it (Debian/Ubuntu: "
                f"apt-get install bubblewrap, or `make setup` as root), or set {ISOLATION_ENV}=none to run "
                "untrusted code without isolation (not recommended).")
    if os.geteuid() == 0 and shutil.which("setpriv", path="/usr/bin:/bin") is None:
        return "The CRUXEval sandbox run as root needs setpriv (util-linux); install util-linux."
    probe = _run_child({"mode": "expression", "expression": "6 * 7"},
                       SandboxLimits(timeout_s=30.0, isolation="bwrap"))
    if probe.status != "ok" or probe.detail != "42":
        return (f"bubblewrap is installed but cannot start the CRUXEval sandbox here ({_short(probe.detail, 300)}); "
                "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or in a container "
                f"run with user namespaces enabled), or set {ISOLATION_ENV}=none to run untrusted code without "
                "isolation (not recommended).")
    return None


def sandbox_available(isolation: str = "bwrap") -> bool:
    return sandbox_problem(isolation) is None


def require_sandbox(limits: SandboxLimits | None = None) -> None:
    """Raise RadError (before any model work) when CRUXEval cannot be scored safely; warn about the opt-out."""
    limits = limits or SandboxLimits()
    problem = sandbox_problem(limits.isolation)
    if problem:
        raise RadError(problem)
    if limits.isolation == "none":
        _warn_no_isolation()


@functools.lru_cache(maxsize=1)
def _warn_no_isolation() -> None:
    logger.warning("CRUXEval code and model predictions run WITHOUT OS isolation (%s=none): they can read and "
                   "write your files and reach the network; every scored item records isolation=none.",
                   ISOLATION_ENV)


# --- running one child ----------------------------------------------------------------------------------------


def _bwrap() -> str | None:
    """The bubblewrap binary: $RAD_BWRAP if set (None when it is not an executable file), else bwrap on PATH."""
    if os.environ.get(BWRAP_ENV):
        return shutil.which(os.environ[BWRAP_ENV])
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


def cgroup_limits(limits: SandboxLimits) -> CgroupLimits:
    """The whole sandbox's memory (every page, all processes: one process's address space plus room for bubblewrap
    and a second process) and its processes and threads."""
    return CgroupLimits(memory_bytes=limits.memory_bytes + CGROUP_HEADROOM_BYTES,
                        max_pids=limits.max_processes + 8)


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    """Set by the harness on itself before it reads any untrusted code (no preexec_fn: unsafe with threads)."""
    values = {
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_CPU": math.ceil(limits.timeout_s) + 1,
        "RLIMIT_FSIZE": limits.max_file_bytes,
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": MAX_OPEN_FILES,  # each memfd or file pins pages: bounded in number as well as in size
    }
    if limits.isolation == "bwrap":  # counted per sandbox (its own user namespace); outside, it would count all
        values["RLIMIT_NPROC"] = limits.max_processes  # the caller's processes
    return values


def _interpreter() -> tuple[str, list[str], list[str]]:
    """(the base interpreter's real path, the host folders it needs besides /usr, its site-packages to hide)."""
    executable = os.path.realpath(sys.executable)
    roots = []
    for path in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(executable))):
        path = os.path.realpath(path)
        if path != "/" and not path.startswith("/usr/") and path != "/usr" and path not in roots:
            roots.append(path)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    hidden = []
    for key in ("purelib", "platlib"):
        site = os.path.realpath(sysconfig.get_path(key, vars=base))
        if os.path.isdir(site) and site not in hidden:
            hidden.append(site)
    return executable, roots, hidden


# Kernel interfaces that CRUXEval code never needs and that are the usual way from a namespace sandbox into the
# kernel (or another process): refused with EPERM by a seccomp filter that libseccomp compiles (other ABIs than
# the native one are killed by libseccomp's default). Defence in depth on top of the namespaces.
SECCOMP_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "mount", "umount2",
    "move_mount", "open_tree", "fsopen", "fsmount", "fspick", "mount_setattr", "pivot_root", "chroot", "unshare",
    "setns", "open_by_handle_at", "name_to_handle_at", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "lookup_dcookie",
    "fanotify_init",
)


class _ScmpArgCmp(ctypes.Structure):  # libseccomp's struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_SCMP_CMP_NE = 1


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes | None:
    """The compiled BPF filter for bwrap --seccomp, from libseccomp (None, logged, when it is not installed)."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        logger.info("libseccomp is not installed: the CRUXEval sandbox runs without its seccomp filter")
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ScmpArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    context = lib.seccomp_init(allow)
    if not context:
        return None
    try:
        for name in SECCOMP_DENIED:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0 and lib.seccomp_rule_add(context, deny, number, 0) < 0:
                return None
        # socket() and socketpair() of any family but AF_UNIX: the network namespace hides AF_INET, not AF_VSOCK's
        # global address space or netlink; benchmark code needs none of them.
        other_family = _ScmpArgCmp(arg=0, op=_SCMP_CMP_NE, datum_a=socket_module.AF_UNIX, datum_b=0)
        for name in ("socket", "socketpair"):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0 and lib.seccomp_rule_add_array(context, deny, number, 1, ctypes.byref(other_family)) < 0:
                return None
        with tempfile.TemporaryFile() as out:
            if lib.seccomp_export_bpf(context, out.fileno()) < 0:
                return None
            out.seek(0)
            return out.read()
    finally:
        lib.seccomp_release(context)


def _system_dirs() -> list[str]:
    """/usr read-only, and /bin, /lib* as the host has them (merged-/usr symlinks or real folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


def _bwrap_command(limits: SandboxLimits, seccomp_fd: int | None) -> list[str]:
    executable, roots, hidden = _interpreter()
    bwrap = _bwrap()
    inner = [
        bwrap, "--unshare-all", "--unshare-user", "--unshare-cgroup", "--disable-userns",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
        *_system_dirs(),
    ]
    for root in roots:
        inner += ["--ro-bind", root, root]
    for site in hidden:
        inner += ["--tmpfs", site, "--remount-ro", site]
    inner += [
        "--dev", "/dev", "--size", str(limits.scratch_bytes), "--tmpfs", "/tmp",
        "--remount-ro", "/dev", "--remount-ro", "/",  # bwrap's own tmpfs: nothing but /tmp is writable
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--clearenv", "--setenv", "HOME", "/tmp", "--setenv", "PATH", "/usr/bin:/bin", "--chdir", "/tmp",
        "--", executable, "-I", "-S", "-c", _HARNESS,
    ]
    if os.geteuid() != 0:
        return inner
    # Root: a mount-only bubblewrap (a minimal tree, the interpreter's folders reachable through world-readable
    # parents) keeps only the capabilities to drop to uid 65534, then the real sandbox starts unprivileged.
    outer = [bwrap, "--die-with-parent", *_system_dirs()]
    made = set()
    for root in roots:
        for parent in reversed(Path(root).parents[:-1]):
            if str(parent) not in made and not str(parent).startswith("/usr"):
                outer += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        outer += ["--ro-bind", root, root]
    outer += ["--perms", "0755", "--dir", "/tmp",  # the inner bwrap mounts its new root on /tmp
              "--proc", "/proc", "--dev", "/dev", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
              "--cap-add", "CAP_SETGID", "--", shutil.which("setpriv", path="/usr/bin:/bin"),
              f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--no-new-privs", "--"]
    return outer + inner


def _plain_command() -> list[str]:
    return [os.path.realpath(sys.executable), "-I", "-S", "-c", _HARNESS]


@dataclass(frozen=True)
class _Reply:
    status: str  # ok (detail is the repr) | error | memory | timeout | crashed
    detail: str = ""


def _run_child(request: dict, limits: SandboxLimits) -> _Reply:
    """Run the harness on one request in a fresh child; the child's reply is data (a repr or an error)."""
    payload = json.dumps({**request, "limits": _rlimits(limits)}).encode()
    with contextlib.ExitStack() as stack:
        request_file = stack.enter_context(tempfile.TemporaryFile())  # a file, not a pipe: no write deadlock
        request_file.write(payload)
        request_file.seek(0)
        errors = stack.enter_context(tempfile.TemporaryFile())
        pass_fds = ()
        if limits.isolation == "bwrap":
            if _bwrap() is None:
                raise RadError(_probe_bwrap(None))
            program = seccomp_program()
            if program is not None:
                seccomp_file = stack.enter_context(tempfile.TemporaryFile())
                seccomp_file.write(program)
                seccomp_file.seek(0)
                pass_fds = (seccomp_file.fileno(),)
            command, cwd, env = _bwrap_command(limits, pass_fds[0] if pass_fds else None), "/", {}
        else:
            _warn_no_isolation()
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="rad-sandbox-"))
            command, env = _plain_command(), {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd}
        deadline = time.monotonic() + limits.timeout_s
        confined = stack.enter_context(confinement(cgroup_limits(limits)))
        proc = subprocess.Popen(confined.wrap(command), stdin=request_file, stdout=subprocess.PIPE, stderr=errors,
                                cwd=cwd, env=env, start_new_session=True, pass_fds=pass_fds)
        try:
            confined.watch(proc.pid)  # from here on, nothing of this child outlives rad
            reply, why = _read_reply(proc, deadline, limits.max_reply_bytes)
            out_of_memory = confined.oom_killed()
        finally:
            confined.release()  # the reaper kills the whole tree before the child is reaped (no pid reuse)
            _kill_tree(proc)
        if out_of_memory and (why or proc.returncode != 0):
            return _Reply("memory", "the sandbox's memory cgroup limit was reached")
        if why:
            return _Reply(why[0], why[1])
        errors.seek(0)
        stderr = errors.read(2000).decode(errors="replace").strip()
    return _parse_reply(reply, proc.returncode, stderr)


def _read_reply(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, tuple[str, str] | None]:
    """Everything the child writes to stdout until it exits, bounded in time and size."""
    fd = proc.stdout.fileno()
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"", ("timeout", "killed at the time limit")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break
        size += len(data)
        if size > cap:
            return b"", ("error", f"reply longer than {cap} bytes")
        chunks.append(data)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return b"", ("timeout", "killed at the time limit")
    return b"".join(chunks), None


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group; with bwrap, --die-with-parent then tears down the pid namespace."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _parse_reply(raw: bytes, returncode: int, stderr: str) -> _Reply:
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return _Reply("timeout", f"CPU limit (exit status {returncode})")
    try:
        reply = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        reply = None
    if not isinstance(reply, dict) or returncode != 0:
        why = f"exit status {returncode}, no readable reply"
        return _Reply("crashed", why + (f" ({_short(stderr, 300)})" if stderr else ""))
    status = reply.get("status")
    if status == "ok" and isinstance(reply.get("repr"), str):
        return _Reply("ok", reply["repr"])
    if status == "memory":
        return _Reply("memory", "out of memory")
    if status == "error" and isinstance(reply.get("error"), str):
        return _Reply("error", reply["error"])
    return _Reply("crashed", "malformed reply")
