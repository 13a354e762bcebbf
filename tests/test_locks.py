"""One writer per output folder (utils/locks.py): a second writer exits 2 naming the first; a dead writer's lock
is free at once, also after SIGKILL. Judged by effect: real processes, the folder's bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rad.cli import main
from rad.errors import RadError
from rad.utils.locks import lock_path, writer_lock

HOLD = """
import sys, time
from rad.utils.locks import writer_lock
with writer_lock(sys.argv[1], "rad distill"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_ones_lock_is_free(tmp_path):
    folder = tmp_path / "out"
    proc = _holder(folder)
    try:
        with pytest.raises(RadError, match=rf"being written by rad distill \(pid {proc.pid} on "), \
                writer_lock(folder, "rad distill"):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with writer_lock(folder, "rad align"):  # no stale lock to clear: the kernel dropped it with the process
        assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
    assert not folder.exists()  # the lock lives beside the folder, never inside it


def test_the_lock_is_released_when_the_block_raises_and_is_per_folder(tmp_path):
    with pytest.raises(ValueError), writer_lock(tmp_path / "a", "rad eval"), \
            writer_lock(tmp_path / "b", "rad eval"):  # another folder: its own lock
        raise ValueError
    with writer_lock(tmp_path / "a", "rad eval"), writer_lock(tmp_path / "b", "rad eval"):
        pass


def test_rad_eval_into_a_folder_another_process_writes_exits_2(tmp_path, caplog):
    """The command itself, before loading anything: the first writer's files are untouched."""
    out = tmp_path / "e"
    out.mkdir()
    (out / "comparison.md").write_text("the first writer's table\n")
    proc = _holder(out)
    try:
        assert main(["eval", "smollm2-135m", "--tasks", "gsm8k", "--limit", "1", "--out", str(out)]) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(f"being written by rad distill (pid {proc.pid}" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")
    assert (out / "comparison.md").read_text() == "the first writer's table\n"
