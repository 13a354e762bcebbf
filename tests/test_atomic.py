"""Folders and result files are written atomically: a killed or racing writer never leaves half of one."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rad.utils.atomic import atomic_directory, atomic_write_bytes, atomic_write_json

WRITER = textwrap.dedent(
    """
    import sys, time
    from rad.utils.atomic import atomic_directory
    dest, mode = sys.argv[1], sys.argv[2]
    with atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("first half")
        if mode == "hang":
            print("ready", flush=True)
            time.sleep(60)
        time.sleep(0.5)
        (tmp / "b.txt").write_text("second half")
    """
)


def test_killed_writer_leaves_no_destination(tmp_path):
    dest = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), "hang"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    assert not dest.exists()
    with atomic_directory(dest) as tmp:  # a later writer succeeds despite the leftover temp folder
        (tmp / "a.txt").write_text("ok")
    assert (dest / "a.txt").read_text() == "ok"


def test_racing_writers_both_succeed_with_a_complete_folder(tmp_path):
    dest = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(dest), "race"]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


def test_exception_inside_removes_temp(tmp_path):
    dest = tmp_path / "out"
    try:
        with atomic_directory(dest) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_writes_replace_whole_files(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "results.json"
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n' and json.loads(path.read_text()) == {"a": 1}
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"b": 2})
    assert path.read_bytes() == b"new"  # the old file, untouched
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind
