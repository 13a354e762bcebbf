"""The CRUXEval sandbox (docs/sandbox.md): escapes checked by their effect on the host, never by the sandbox's own
report; verdicts that cannot be forged; CRUXEval's `==` semantics on real items; the fallback when bubblewrap is
missing. Each sandboxed run takes ~0.2 s."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rad.errors import RadError
from rad.evaluate.confine import CgroupLimits
from rad.evaluate.inputs import check_task_data
from rad.evaluate.sandbox import (
    BWRAP_ENV,
    ISOLATION_ENV,
    SandboxLimits,
    check_output_prediction,
    require_sandbox,
    sandbox_problem,
    seccomp_program,
)
from tests.conftest import SHARED_DATA

PROBLEM = sandbox_problem()
needs_bwrap = pytest.mark.skipif(PROBLEM is not None, reason=f"no usable sandbox: {PROBLEM}")
CRUXEVAL = SHARED_DATA / "cruxeval.jsonl"
needs_data = pytest.mark.skipif(not CRUXEVAL.is_file(), reason="no ../shared/data")
FAST = SandboxLimits(timeout_s=3.0, isolation="bwrap")


def run(code: str, prediction: str = "1", inputs: str = "1", limits: SandboxLimits = FAST):
    return check_output_prediction(code, inputs, prediction, limits)


def body(*lines: str) -> str:
    """`def f(x):` with these lines as its body."""
    return "def f(x):\n" + "".join(f"    {line}\n" for line in lines)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (read from the host's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # exited while we looked
                pass
    return found


def survivors(marker: str, within_s: float = 10.0) -> list[int]:
    """Poll until no process carries `marker` (or the bound passes); kill and return any that survived."""
    deadline = time.monotonic() + within_s
    while (alive := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:  # a broken sandbox must not leave the test's own processes running
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return alive


# --- commands, files, network: by effect on the host ---------------------------------------------------------


@needs_bwrap
@pytest.mark.parametrize("attack", [
    "__import__('posix').system('touch {mark}')",
    "__import__('os').system('touch {mark}')",
    "__import__('ctypes').CDLL(None).system(b'touch {mark}')",
    "__import__('os').waitpid(__import__('os').posix_spawn('/bin/sh', ['sh', '-c', 'touch {mark}'], {{}}), 0)",
    "__import__('subprocess').run(['touch', '{mark}'])",  # _posixsubprocess underneath
    "__import__('os').makedirs('{parent}', exist_ok=True) or open('{mark}', 'w').write('escaped')",
])
def test_code_and_predictions_cannot_run_commands_or_write_host_files(tmp_path, attack):
    mark = tmp_path / "escaped"
    payload = attack.format(mark=mark, parent=tmp_path)
    run(body(payload, "return 1"))  # as benchmark code
    run(body("return 1"), prediction=payload)  # as the model's prediction
    assert not mark.exists()


@needs_bwrap
def test_host_files_cannot_be_deleted(tmp_path):
    # Every target is the test's own: if the sandbox ever breaks, this test fails without damaging the host.
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for attack in (f"__import__('posix').unlink('{keep}')", f"__import__('os').remove('{keep}')",
                   f"__import__('shutil').rmtree('{tmp_path}')", f"__import__('os').system('rm -rf {tmp_path}')"):
        run(body(f"try:\n        {attack}\n    except BaseException:\n        pass", "return 1"))
        run(body("return 1"), prediction=attack)
    assert keep.read_text() == "precious"


@needs_bwrap
def test_the_only_writable_place_is_the_private_scratch():
    name = f"rad-sandbox-probe-{secrets.token_hex(6)}"
    folders = ("/tmp", "/usr", "/", "/dev", "/root", "/usr/lib")
    probe = body("import os",
                 "ok = []",
                 f"for d in {folders!r}:",
                 "    try:",
                 f"        open(os.path.join(d, {name!r}), 'x').close(); ok.append(d)",
                 "    except OSError:",
                 "        pass",
                 "return ok")
    try:
        assert run(probe, prediction="['/tmp']").passed
    finally:  # only what this test wrote, should the sandbox ever leak
        leaked = [Path(d, name) for d in folders if Path(d, name).exists()]
        for path in leaked:
            path.unlink()
    assert leaked == []


@needs_bwrap
def test_the_view_holds_only_what_the_interpreter_needs():
    import sysconfig

    site = sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    probe = body("import os",
                 "seen = [p for p in ('/work', '/home', '/proc/self', '/sys/kernel', '/etc/passwd', "
                 f"{str(Path.cwd())!r}, {str(Path(__file__).resolve())!r}) if os.path.exists(p)]",
                 f"return seen, os.listdir({os.path.realpath(site)!r}) if os.path.isdir({os.path.realpath(site)!r}) "
                 "else [], os.getuid(), os.getgroups()")
    assert run(probe, prediction="([], [], 65534, [])").passed


@needs_bwrap
def test_host_secrets_cannot_be_read(tmp_path, monkeypatch):
    token = secrets.token_hex(16)
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    monkeypatch.setenv("RAD_TEST_SECRET", token)  # the environment (API tokens) is not passed either
    assert not run(body("import os", "return os.environ.get('RAD_TEST_SECRET')"), prediction=repr(token)).passed
    # the code reading it: a prediction of the secret only passes if the code saw it
    assert not run(body(f"return open('{secret}').read()"), prediction=repr(token)).passed
    assert not run(body(f"return open('/proc/1/root{secret}').read()"), prediction=repr(token)).passed
    # the prediction reading it, against a function that returns the secret
    assert not run(body(f"return {token!r}"), prediction=f"open('{secret}').read()").passed
    assert run(body(f"return {token!r}"), prediction=repr(token)).passed  # the comparison itself works


@needs_bwrap
@needs_data
def test_a_prediction_cannot_look_up_the_answer_in_the_data_set():
    row = json.loads(CRUXEVAL.read_text().splitlines()[0])
    cheat = (f"[__import__('ast').literal_eval(r['output']) for r in map(__import__('json').loads, "
             f"open('{CRUXEVAL.resolve()}')) if r['id'] == {row['id']!r}][0]")
    assert not check_output_prediction(row["code"], row["input"], cheat, FAST).passed
    assert check_output_prediction(row["code"], row["input"], row["output"], FAST).passed


@needs_bwrap
def test_no_network_not_even_loopback():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0rad-sandbox-test-{secrets.token_hex(4)}"
    abstract.bind(name)
    abstract.listen(8)
    abstract.setblocking(False)
    tcp_port, udp_port = server.getsockname()[1], udp.getsockname()[1]
    attacks = [
        f"__import__('socket').create_connection(('127.0.0.1', {tcp_port})).sendall(b'leak')",
        f"__import__('socket').socket(2, 2).sendto(b'leak', ('127.0.0.1', {udp_port}))",
        f"__import__('_socket').socket().connect(('127.0.0.1', {tcp_port}))",
        f"__import__('socket').socket(1, 1).connect({name!r})",
        f"__import__('os').system('exec 3<>/dev/tcp/127.0.0.1/{tcp_port}; echo leak >&3')",
    ]
    try:
        for attack in attacks:
            run(body(f"try:\n        {attack}\n    except OSError:\n        pass", "return 1"))
            run(body("return 1"), prediction=attack)
        for listener in (server, abstract):
            with pytest.raises(BlockingIOError):  # nothing ever connected
                listener.accept()
        with pytest.raises(BlockingIOError):  # nothing was ever sent
            udp.recv(64)
    finally:
        server.close(), udp.close(), abstract.close()


@needs_bwrap
@pytest.mark.skipif(seccomp_program() is None, reason="libseccomp is not installed")
def test_kernel_interfaces_outside_the_need_are_refused():
    # PTRACE_TRACEME succeeds in any plain process; the seccomp filter answers EPERM (errno 1)
    probe = body("import ctypes", "libc = ctypes.CDLL(None, use_errno=True)",
                 "return libc.ptrace(0, 0, 0, 0), ctypes.get_errno()")
    assert run(probe, prediction="(-1, 1)").passed


# --- processes: nothing outlives the run, fork bombs stay contained ---------------------------------------------


@needs_bwrap
def test_a_detached_grandchild_dies_with_the_sandbox(tmp_path):
    marker = f"radmarker{secrets.token_hex(6)}"
    mark = tmp_path / "heartbeat"
    daemon = (f"while :; do touch {mark}; echo x > /dev/tcp/127.0.0.1/9; : {marker}; sleep 0.05; done")
    code = body("import os",
                "if os.fork() == 0:",
                "    os.setsid()",
                "    if os.fork() == 0:",
                f"        os.execv('/bin/bash', ['bash', '-c', {daemon!r}])",
                "    os._exit(0)",
                "return 1")
    assert run(code).passed  # f itself returned 1; its detached grandchild must not survive the run
    assert survivors(marker) == []
    looping = code.replace("return 1", "while True:\n        pass")  # and when the run is killed at the limit
    assert run(looping, limits=SandboxLimits(timeout_s=1.5)).status == "timeout"
    assert survivors(marker) == []
    assert not mark.exists()


@needs_bwrap
def test_a_fork_bomb_is_contained_and_killed_in_time():
    marker = f"radbomb{secrets.token_hex(6)}"
    code = body("import os", f"os.execv('/bin/sh', ['sh', '-c', 'b() {{ b | b & }}; b; : {marker}; wait'])")
    start = time.monotonic()
    result = run(code, limits=SandboxLimits(timeout_s=2.0))
    assert not result.passed and time.monotonic() - start < 4.0
    assert survivors(marker) == []


@needs_bwrap
def test_the_process_limit_holds_inside_the_sandbox():
    forks = body("import os, time",
                 "n = 0",
                 "try:",
                 "    while n < 200:",
                 "        if os.fork() == 0:",
                 "            time.sleep(60)",
                 "            os._exit(0)",
                 "        n += 1",
                 "except OSError:",
                 "    pass",
                 "return n")
    result = run(forks, prediction="-1", limits=SandboxLimits(timeout_s=5.0, max_processes=6))
    assert result.status == "failed"
    forked = int(result.detail.rsplit(" ", 1)[1])
    assert 1 <= forked <= 6


@needs_bwrap
def test_an_infinite_loop_is_killed_within_the_time_limit():
    start = time.monotonic()
    result = run(body("while True:", "    x += 1"), limits=SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout" and time.monotonic() - start < 3.0


@needs_bwrap
def test_a_10gb_allocation_is_refused():
    result = run(body("return len(bytearray(10 * 1024**3))"))
    assert result.status == "memory" and not result.passed


@needs_bwrap
def test_an_enormous_reply_is_not_read_whole():
    result = run(body("return 'x' * (50 * 1024 * 1024)"), prediction="'x'")
    assert result.status == "error" and "longer than" in result.detail


# --- verdicts: decided by the parent, unforgeable by either child ------------------------------------------------


FAKES = ('{"status": "passed"}', '{"nonce": "0", "status": "passed"}', '{"status": "ok", "repr": "2"}')


@needs_bwrap
@pytest.mark.parametrize("forgery", [
    body(*(f"print({fake!r})" for fake in FAKES), "return 1"),
    body("import os", *(f"os.write(1, {fake!r}.encode())" for fake in FAKES), "return 1"),
    body("import os", "for fd in range(64):", "    try:",
         *(f"        os.write(fd, {fake!r}.encode())" for fake in FAKES), "    except OSError:", "        pass",
         "return 1"),
    body("import os", "os._exit(0)"),
    body("import sys", "sys.exit(0)"),
    body("raise SystemExit(0)"),
    body("import os, signal", "os.kill(os.getpid(), signal.SIGKILL)"),
    body("import os", "os.close(1)", "return 1"),
])
def test_benchmark_code_cannot_make_a_wrong_prediction_pass(forgery):
    assert not run(forgery, prediction="2").passed


@needs_bwrap
@pytest.mark.parametrize("prediction", [
    "type('Any', (), {'__eq__': lambda self, other: True, '__hash__': lambda self: 0})()",
    "__import__('unittest.mock', fromlist=['ANY']).ANY",
    "f(1)",  # the prediction never sees the benchmark code
    "__import__('os')._exit(0)",
    "[__import__('os').write(fd, b'{\"status\": \"ok\", \"repr\": \"1\"}') for fd in range(3, 9)] and 2",
    "print('{\"status\": \"passed\"}') or 2",
    "exec('raise SystemExit(0)')",
])
def test_a_wrong_prediction_cannot_pass(prediction):
    result = run(body("return 1"), prediction=prediction)
    assert not result.passed, result


@needs_bwrap
def test_predictions_as_expressions_are_evaluated_apart_and_compared_by_value():
    assert run(body("return [3, 3]"), prediction="[3] * 2").passed
    assert run(body("return 'ab' * 2"), prediction="'abab'").passed
    assert run(body("return 'AbC'.lower()"), prediction="'abc'").passed


@needs_bwrap
@pytest.mark.parametrize("code_returns,prediction,passes", [
    ("1", "1.0", True),  # CRUXEval compares with Python ==
    ("True", "1", True),
    ("(1, 2)", "[1, 2]", False),  # a tuple is not a list
    ("{'a': 1, 'b': 2}", "{'b': 2, 'a': 1}", True),
    ("set()", "set()", True),
    ("{1, 2}", "{2, 1}", True),
    ("float('inf')", "float('inf')", True),
    ("-float('inf')", "-inf", True),
    ("float('nan')", "float('nan')", False),  # nan != nan, as in CRUXEval
    ("b'x'", "b'x'", True),
    ("'x'", "b'x'", False),
    ("None", "None", True),
    ("1", "  1  ", True),
    ("iter([1])", "iter([1])", False),  # not a literal: cannot be compared
])
def test_cruxeval_equality_semantics(code_returns, prediction, passes):
    assert run(body(f"return {code_returns}"), prediction=prediction).passed is passes


@needs_bwrap
def test_errors_say_where_they_happened():
    wrong_type = run(body("return x + 1"), inputs="'a'")
    assert wrong_type.status == "error" and "TypeError" in wrong_type.detail and wrong_type.detail.startswith("f(")
    syntax = run(body("return 1"), prediction="[(4, 1)")
    assert syntax.status == "error" and "SyntaxError" in syntax.detail
    name = run(body("return 1"), prediction="undefined_name + 1")
    assert name.status == "error" and "NameError" in name.detail and name.detail.startswith("prediction")


# --- real CRUXEval items -------------------------------------------------------------------------------------


def _perturbed(value):
    """A value of the same kind that differs from `value` under ==."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, (str, bytes)):
        return value + value[:0].__class__("!" if isinstance(value, str) else b"!")
    if isinstance(value, (list, tuple)):
        return type(value)([*value, "!"])
    if isinstance(value, dict):
        return {**value, "!": "!"}
    if isinstance(value, set):
        return value | {"!"}
    return "!" if value is None else None


@needs_bwrap
@needs_data
def test_reference_outputs_of_real_items_pass_and_perturbed_ones_fail():
    rows = [json.loads(line) for line in CRUXEVAL.read_text().splitlines() if line.strip()]
    sample = rows[:: max(1, len(rows) // 16)][:16]
    for row in sample:
        right = check_output_prediction(row["code"], row["input"], row["output"], FAST)
        assert right.passed, (row["id"], right)
        wrong = repr(_perturbed(ast.literal_eval(row["output"])))
        assert check_output_prediction(row["code"], row["input"], wrong, FAST).status == "failed", row["id"]


# --- fallback and opt-out ---------------------------------------------------------------------------------------


def test_missing_bubblewrap_is_one_clear_error_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-bwrap"))
    monkeypatch.delenv(ISOLATION_ENV, raising=False)
    with pytest.raises(RadError, match="bubblewrap, which is not installed; install it"):
        require_sandbox()
    with pytest.raises(RadError, match="bubblewrap"):
        check_task_data(["cruxeval"], ("file",), str(SHARED_DATA), "skip")
    with pytest.raises(RadError, match="bubblewrap"):
        check_output_prediction(body("return 1"), "1", "1")
    # GSM8K alone needs no sandbox
    assert check_task_data(["gsm8k"], ("file",), str(SHARED_DATA), "skip")[2][-1].what != "CRUXEval sandbox"


def test_opting_out_is_loud_and_recorded(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(ISOLATION_ENV, "none")
    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-bwrap"))
    limits = SandboxLimits(timeout_s=3.0)
    assert limits.isolation == "none"
    with caplog.at_level(logging.WARNING):
        require_sandbox(limits)
    assert "WITHOUT OS isolation" in caplog.text
    result = check_output_prediction(body("return [1, 2]"), "1", "[1, 2]", limits)
    assert result.passed and result.isolation == "none"
    assert not check_output_prediction(body("return 1"), "1", "type('A', (), {'__eq__': lambda s, o: True})()",
                                       limits).passed
    with pytest.raises(RadError, match="Unknown sandbox isolation"):
        SandboxLimits(isolation="docker")


# --- the kernel's part: a reaper that outlives rad's death, a memory cgroup, socket families (issue 27 §1) -------

_RAD_STAND_IN = """
import sys
from rad.evaluate.sandbox import SandboxLimits, check_program
print(check_program(open(sys.argv[1]).read(), SandboxLimits(timeout_s=300.0)), flush=True)
"""


@needs_bwrap
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_of_the_sandbox_outlives_a_killed_rad_by_a_second(sig, tmp_path):
    """The process that scores is killed mid-check (as a user, the OOM killer or a scheduler would): every process
    of the sandbox, a daemonised one included, is gone from the host's process table within a second."""
    marker = f"radorphan{secrets.token_hex(6)}"
    loop = f"while :; do : {marker}; sleep 0.05; done"
    code = "\n".join([
        "import os",
        "if os.fork() == 0:",
        "    os.setsid()",
        "    if os.fork() == 0:",
        f"        os.execv('/bin/bash', ['bash', '-c', {loop!r}])",
        "    os._exit(0)",
        f"os.execv('/bin/bash', ['bash', '-c', {loop!r}])",  # and the checked program itself never returns
    ])
    program = tmp_path / "program.py"  # not on rad's command line: only sandbox processes carry the marker
    program.write_text(code)
    rad = subprocess.Popen([sys.executable, "-c", _RAD_STAND_IN, str(program)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(processes_with(marker)) < 2 and time.monotonic() < deadline and rad.poll() is None:
            time.sleep(0.05)
        assert rad.poll() is None, f"the check ended before it was killed: {rad.communicate()[0][-2000:]}"
        assert len(processes_with(marker)) >= 2, "the sandboxed program and its daemon never started"
        rad.send_signal(sig)
        rad.wait()
        killed_at = time.monotonic()
        while processes_with(marker) and time.monotonic() - killed_at < 1.0:
            time.sleep(0.01)
        assert survivors(marker, within_s=0) == [], f"sandbox processes outlived rad by over a second ({sig!r})"
    finally:
        with contextlib.suppress(ProcessLookupError):
            rad.kill()
        survivors(marker, within_s=0)
    # The reaper removes the cgroups once the kernel lets go of their last member (it retries for 10 s).
    leftover = lambda: list(Path("/sys/fs/cgroup").glob(f"*/**/rad-sandbox-{rad.pid}-*"))  # noqa: E731
    deadline = time.monotonic() + 12
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftover(), "its cgroup was left behind"


def _host_shmem() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


_SYSV_SHM = body(
    "import ctypes",
    "libc = ctypes.CDLL(None, use_errno=True)",
    "libc.shmget.restype, libc.shmat.restype = ctypes.c_int, ctypes.c_void_p",
    "for _ in range(48):",  # 3 GiB of segments that outlive shmdt; RLIMIT_AS never sees them
    "    segment = libc.shmget(0, 64 << 20, 0o1000 | 0o600)",
    "    address = libc.shmat(segment, None, 0)",
    "    ctypes.memset(address, 1, 64 << 20)",
    "    libc.shmdt(ctypes.c_void_p(address))",
    "return 1")
_MEMFDS = body(
    "import os",
    "files = []",
    "for _ in range(3000):",  # each under RLIMIT_FSIZE: 3 GB in all without a limit on their number
    "    fd = os.memfd_create('pin')",
    "    os.write(fd, bytes((1 << 20) - 1))",
    "    files.append(fd)",
    "return 1")


@needs_bwrap
@pytest.mark.skipif(CgroupLimits.available() is not None, reason=f"no cgroup here: {CgroupLimits.available()}")
@pytest.mark.parametrize("attack", [_SYSV_SHM, _MEMFDS], ids=["sysv-shm", "memfd"])
def test_memory_outside_the_address_space_limit_is_bounded_on_the_host(attack):
    """Shared memory is what these attacks pin (the host's Shmem in /proc/meminfo); it stays within the sandbox's
    cgroup limit (256 MiB address space + 256 MiB headroom here) instead of growing by 3 GB."""
    limits = SandboxLimits(timeout_s=60.0, memory_bytes=256 << 20)
    before, peak, done = _host_shmem(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _host_shmem())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run(attack, limits=limits)
    finally:
        done.set()
        watcher.join()
    assert not result.passed and result.status in ("memory", "error"), result
    grown = peak[0] - before
    assert grown < 600 << 20, f"the host's shared memory grew by {grown / 2**20:.0f} MiB"
    deadline = time.monotonic() + 30  # the kernel frees an IPC namespace's segments a moment after its last process
    while _host_shmem() - before >= 64 << 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _host_shmem() - before < 64 << 20  # and it was all given back


@needs_bwrap
@pytest.mark.skipif(seccomp_program() is None, reason="libseccomp is not installed")
def test_only_unix_sockets_can_be_made():
    families = {"AF_VSOCK": 40, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
    for name, family in families.items():
        probe = body("import socket", "try:", f"    socket.socket({family}, socket.SOCK_STREAM if {family} != 16 else "
                     "socket.SOCK_RAW)", "except OSError as err:", "    return err.errno", "return 0")
        assert run(probe, prediction="1").passed, name  # EPERM from the filter
    pair = body("import socket", "a, b = socket.socketpair()", "a.send(b'x')", "return b.recv(1)")
    assert run(pair, prediction="b'x'").passed
