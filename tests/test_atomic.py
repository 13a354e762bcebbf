"""The cache and output folders are written atomically: killed or racing writers never leave half a folder."""

import subprocess
import sys
import textwrap

from rad.utils.atomic import atomic_directory

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
