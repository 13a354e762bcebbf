"""Hostile input: nothing a user types loses data or prints a traceback, and every setting is checked first.

Each class of docs/reliability.md has several cases; every case checks effects: exit code 2, exactly one
error sentence, no traceback, the protected files byte-identical afterwards, no output folder created and
no `.tmp-*` left behind. Models are tiny folders (a word-level tokenizer, no real model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rad.cli import main
from rad.errors import RadError
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid

from .conftest import make_tiny, word_tokenizer

GSM_ROW = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama source, its rad hybrid, and a distilled-student look-alike (record with distillation)."""
    root = tmp_path_factory.mktemp("hostile")
    tokenizer, source = word_tokenizer(), make_tiny("llama")
    source.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    config = ConversionConfig(layers=[1, 3])
    hybrid = convert_to_hybrid(source, config)
    record = conversion_record(str(root / "src"), source, config)
    save_hybrid(hybrid, tokenizer, root / "hybrid", record)
    student = root / "student"
    save_hybrid(hybrid, tokenizer, student, record)
    data = json.loads((student / "rad_conversion.json").read_text())
    data["distillation"] = {"teacher": "src", "train": "mixers", "steps": 1, "data": "default"}
    (student / "rad_conversion.json").write_text(json.dumps(data))
    return {"root": root, "src": root / "src", "hybrid": root / "hybrid", "student": student}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub; the data folder holds a tiny GSM8K test and train so `rad eval` and `rad run` find data."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("gsm8k_test.jsonl", "gsm8k_train.jsonl"):
        (data / name).write_text("".join(json.dumps(GSM_ROW) + "\n" for _ in range(4)))
    monkeypatch.setenv("RAD_DATA_DIR", str(data))
    monkeypatch.setenv("RAD_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return data


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (and folder) under `roots`: path -> SHA-256 (folders: 'dir')."""
    state = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run_cli(args: list[str], caplog, capsys) -> tuple[int, list[str], str]:
    """`rad ARGS` in process: (exit code, error sentences logged, stderr)."""
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="rad"):
        code = main([str(a) for a in args])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return code, errors, capsys.readouterr().err


def assert_refused(args, caplog, capsys, *, words: str = "", protect: tuple[Path, ...] = (),
                   absent: tuple[Path, ...] = (), tmp_root: Path | None = None) -> str:
    """Exit 2, one error sentence (with `words`), no traceback, `protect` byte-identical, `absent` absent."""
    before = snapshot(*protect)
    code, errors, stderr = run_cli(args, caplog, capsys)
    assert code == 2, (args, errors)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert words.lower() in errors[0].lower(), (words, errors[0])
    assert "Traceback" not in stderr
    assert snapshot(*protect) == before, "a protected file or folder changed"
    for path in absent:
        assert not path.exists(), f"{path} was created"
    if tmp_root is not None:
        assert not list(tmp_root.rglob(".tmp-*")), "a temporary folder was left behind"
    return errors[0]


# ---------------------------------------------------------------- 1. data loss: --out overlapping an input


OVERLAP_CASES = {
    "distill into the hybrid": (["distill", "{hybrid}", "--out", "{hybrid}", "--steps", "1"], "hybrid", "itself"),
    "distill inside the hybrid": (["distill", "{hybrid}", "--out", "{hybrid}/d", "--steps", "1"], "hybrid",
                                  "inside"),
    "distill into its teacher": (["distill", "{hybrid}", "--out", "{src}", "--steps", "1"], "src", "teacher"),
    "distill into a folder holding the hybrid": (["distill", "{hybrid}", "--out", "{root}", "--steps", "1"],
                                                 "hybrid", "contains"),
    "convert inside the model": (["convert", "{src}", "--layers", "1", "--out", "{src}/h"], "src", "inside"),
    "convert over the model": (["convert", "{src}", "--layers", "1", "--out", "{src}", "--overwrite"], "src",
                               "itself"),
    "search into the model": (["search", "{src}", "--k", "1", "--out", "{src}"], "src", "itself"),
    "search inside the model": (["search", "{src}", "--k", "1", "--out", "{src}/s"], "src", "inside"),
    "eval into the model": (["eval", "{src}", "--tasks", "gsm8k", "--out", "{src}"], "src", "itself"),
    "eval inside the teacher": (["eval", "{hybrid}", "--teacher", "{src}", "--tasks", "gsm8k", "--out", "{src}/e"],
                                "src", "inside"),
    "run into the model": (["run", "--preset", "smoke", "--set", "model={src}", "--out", "{src}"], "src", "itself"),
    "ablate inside the model": (["ablate", "--preset", "smoke", "--set", "model={src}", "--out", "{src}/a"], "src",
                                "inside"),
}


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_out_overlapping_an_input_is_refused_and_nothing_changes(case, folders, caplog, capsys):
    args, protected, words = OVERLAP_CASES[case]
    args = [a.format(**{k: str(v) for k, v in folders.items()}) for a in args]
    assert_refused(args, caplog, capsys, words=words, protect=(folders[protected],),
                   tmp_root=folders["root"])


# ---------------------------------------------------------------- 1b. --overwrite and foreign folders


def _foreign(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("three years of notes")
    (folder / "config.json").write_text('{"not": "a rad file"}')
    return folder


OUT_COMMANDS = {
    "convert": ["convert", "{src}", "--layers", "1", "--out", "{out}"],
    "distill": ["distill", "{hybrid}", "--out", "{out}", "--steps", "1"],
    "search": ["search", "{src}", "--k", "1", "--out", "{out}"],
    "eval": ["eval", "{src}", "--tasks", "gsm8k", "--out", "{out}"],
    "run": ["run", "--preset", "smoke", "--set", "model={src}", "--out", "{out}"],
    "ablate": ["ablate", "--preset", "smoke", "--set", "model={src}", "--out", "{out}"],
}
FOREIGN_CASES = {"convert --overwrite": [*OUT_COMMANDS["convert"], "--overwrite"], **OUT_COMMANDS}


@pytest.mark.parametrize("command", list(FOREIGN_CASES))
def test_a_folder_rad_did_not_write_is_never_written_into_or_replaced(command, folders, tmp_path, caplog, capsys):
    out = _foreign(tmp_path)
    args = [a.format(out=out, src=folders["src"], hybrid=folders["hybrid"]) for a in FOREIGN_CASES[command]]
    assert_refused(args, caplog, capsys, words="did not write", protect=(out,), tmp_root=tmp_path)


def test_overwrite_replaces_only_an_earlier_conversion(folders, tmp_path, caplog, capsys):
    out = tmp_path / "converted" / "hyb"
    assert run_cli(["convert", folders["src"], "--layers", "1", "--out", out], caplog, capsys)[0] == 0
    # A distilled student is not `rad convert`'s to replace, even with --overwrite.
    assert_refused(["convert", folders["src"], "--layers", "2", "--out", folders["student"], "--overwrite"],
                   caplog, capsys, words="distilled student", protect=(folders["student"],))
    assert_refused(["convert", folders["src"], "--layers", "2", "--out", out], caplog, capsys,
                   words="--overwrite", protect=(out,))
    assert run_cli(["convert", folders["src"], "--layers", "2", "--out", out, "--overwrite"], caplog, capsys)[0] == 0
    assert json.loads((out / "rad_conversion.json").read_text())["converted_layers"] == [2]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hyb"]  # no .tmp-* or .old-* left


def test_eval_never_reads_or_deletes_an_items_file_it_did_not_write(folders, tmp_path, caplog, capsys):
    out = tmp_path / "eval"
    model_dir = out / "src"
    model_dir.mkdir(parents=True)
    (out / "comparison.md").write_text("| earlier |\n")  # an eval folder, but this file is not rad's
    (model_dir / "gsm8k.jsonl").write_text("my own lines, not items\n{\"id\": 1}\n")
    for extra in ([], ["--overwrite"]):
        assert_refused(["eval", folders["src"], "--tasks", "gsm8k", "--limit", "1", "--out", out, *extra],
                       caplog, capsys, words="not written by rad eval", protect=(model_dir / "gsm8k.jsonl",))


# ---------------------------------------------------------------- 2. values that parse to nothing or are out of range


BAD_VALUES = {
    "empty layer list": (["convert", "{src}", "--layers", " , ,", "--out", "{out}"], "names no layer"),
    "uniform:0": (["convert", "{src}", "--layers", "uniform:0", "--out", "{out}"], "names no layer"),
    "duplicate layer": (["convert", "{src}", "--layers", "1,1", "--out", "{out}"], "twice"),
    "negative layer": (["convert", "{src}", "--layers", "-1", "--out", "{out}"], "counted from 0"),
    "layer past the end": (["convert", "{src}", "--layers", "0,4", "--out", "{out}"], "out of range"),
    "chunk size 0": (["convert", "{src}", "--layers", "1", "--chunk-size", "0", "--out", "{out}"], "chunk-size"),
    "unknown dtype": (["convert", "{src}", "--layers", "1", "--dtype", "int3", "--out", "{out}"], "dtype"),
    "negative temperature (generate)": (["generate", "{src}", "--prompt", "w3", "--temperature", "-1"],
                                        "temperature"),
    "top-p 0": (["generate", "{src}", "--prompt", "w3", "--top-p", "0"], "top_p"),
    "empty skip list": (["generate", "{src}", "--prompt", "w3", "--speculative", "--skip", " , "], "names no layer"),
    "negative temperature (distill)": (["distill", "{hybrid}", "--out", "{out}", "--temperature", "-1"],
                                       "temperature"),
    "zero lr": (["distill", "{hybrid}", "--out", "{out}", "--lr", "0"], "learning rate"),
    "negative lr": (["distill", "{hybrid}", "--out", "{out}", "--lr=-1e-4"], "learning rate"),
    "zero micro-batch": (["distill", "{hybrid}", "--out", "{out}", "--micro-batch", "0"], "micro_batch"),
    "zero steps": (["distill", "{hybrid}", "--out", "{out}", "--steps", "0"], "steps"),
    "negative steps": (["distill", "{hybrid}", "--out", "{out}", "--steps", "-5"], "steps"),
    "negative keep-checkpoints": (["distill", "{hybrid}", "--out", "{out}", "--keep-checkpoints", "-1"],
                                  "keep_checkpoints"),
    "negative keep-checkpoints (align)": (["align", "{hybrid}", "--out", "{out}", "--keep-checkpoints", "-1"],
                                          "keep_checkpoints"),
    "seq-len 1": (["distill", "{hybrid}", "--out", "{out}", "--seq-len", "1"], "seq_len"),
    "negative weight decay": (["distill", "{hybrid}", "--out", "{out}", "--weight-decay", "-1"], "weight_decay"),
    "zero grad norm": (["distill", "{hybrid}", "--out", "{out}", "--max-grad-norm", "0"], "max_grad_norm"),
    "negative kl weight": (["distill", "{hybrid}", "--out", "{out}", "--kl-weight", "-1"], "kl loss weight"),
    "all loss weights 0": (["distill", "{hybrid}", "--out", "{out}", "--kl-weight", "0", "--align-weight", "0"],
                           "nothing would be learnt"),
    "zero loss chunk": (["distill", "{hybrid}", "--out", "{out}", "--loss-chunk", "0"], "loss chunk"),
    "warm-up ratio 1": (["distill", "{hybrid}", "--out", "{out}", "--warmup-ratio", "1"], "warmup_ratio"),
    "zero trials": (["search", "{src}", "--k", "1", "--trials", "0", "--out", "{out}"], "trials"),
    "k of every layer": (["search", "{src}", "--k", "4", "--out", "{out}"], "choose k below"),
    "bad keep list": (["search", "{src}", "--k", "1", "--keep", "1,x", "--out", "{out}"], "--keep"),
    "zero limit": (["eval", "{src}", "--tasks", "gsm8k", "--limit", "0", "--out", "{out}"], "--limit"),
    "empty task list": (["eval", "{src}", "--tasks", " , ", "--out", "{out}"], "task"),
    "negative exec timeout": (["eval", "{src}", "--tasks", "gsm8k", "--exec-timeout", "-1", "--out", "{out}"],
                              "--exec-timeout"),
    "infinite exec timeout": (["eval", "{src}", "--tasks", "gsm8k", "--exec-timeout", "inf", "--out", "{out}"],
                              "--exec-timeout"),
    "NaN exec timeout": (["eval", "{src}", "--tasks", "gsm8k", "--exec-timeout", "nan", "--out", "{out}"],
                         "--exec-timeout"),
    "huge exec timeout": (["eval", "{src}", "--tasks", "gsm8k", "--exec-timeout", "1e300", "--out", "{out}"],
                          "--exec-timeout"),
    "negative n-shot": (["eval", "{src}", "--tasks", "gsm8k", "--n-shot", "-2", "--out", "{out}"], "--n-shot"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_values_that_parse_to_nothing_or_out_of_range_are_refused_before_any_write(case, folders, tmp_path, caplog,
                                                                                   capsys):
    args, words = BAD_VALUES[case]
    out = tmp_path / "out"
    args = [a.format(out=out, src=folders["src"], hybrid=folders["hybrid"]) for a in args]
    assert_refused(args, caplog, capsys, words=words, absent=(out,), protect=(folders["src"], folders["hybrid"]),
                   tmp_root=tmp_path)


def test_the_same_checks_hold_for_the_python_api_and_yaml():
    from rad.decoding.speculative import SamplingConfig
    from rad.distill import DataConfig, DistillConfig, LossWeights
    from rad.pipeline import load_run_config

    for make in (lambda: LossWeights(temperature=-1), lambda: DataConfig(seq_len=0),
                 lambda: DistillConfig(hybrid="h", out="o", micro_batch=0), lambda: SamplingConfig(top_p=1.5),
                 lambda: ConversionConfig(layers=[1], chunk_size=0), lambda: DistillConfig(hybrid="h", out="o",
                                                                                             device="banana")):
        with pytest.raises(RadError):
            make()
    for override in ("distill.seq_len=1", "distill.kl_weight=-1", "search.trials=0", "device=banana", "seed=-1"):
        with pytest.raises(RadError):
            load_run_config("smoke", None, [override])


# ---------------------------------------------------------------- 3. late checks: bad --out, devices, --set


def _absent_device() -> str:
    return f"cuda:{torch.cuda.device_count() + 7}" if torch.cuda.is_available() else "cuda"




@pytest.mark.parametrize("command", list(OUT_COMMANDS))
@pytest.mark.parametrize("kind", ["a file", "inside a file", "unwritable"])
def test_an_out_that_cannot_be_a_folder_is_one_sentence(command, kind, folders, tmp_path, caplog, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    out = {"a file": afile, "inside a file": afile / "sub", "unwritable": Path("/proc/rad-cannot-write/out")}[kind]
    args = [a.format(out=out, src=folders["src"], hybrid=folders["hybrid"]) for a in OUT_COMMANDS[command]]
    words = {"a file": "is a file", "inside a file": "which is a file", "unwritable": "cannot be written"}[kind]
    assert_refused(args, caplog, capsys, words=words, protect=(afile,), tmp_root=tmp_path)


DEVICE_COMMANDS = {
    "info": ["info", "{src}"],
    "generate": ["generate", "{src}", "--prompt", "w3"],
    "convert": ["convert", "{src}", "--layers", "1", "--out", "{out}"],
    "distill": ["distill", "{hybrid}", "--out", "{out}", "--steps", "1"],
    "search": ["search", "{src}", "--k", "1", "--out", "{out}"],
    "eval": ["eval", "{src}", "--tasks", "gsm8k", "--out", "{out}"],
}


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
@pytest.mark.parametrize("device", ["absent-cuda", "mps", "banana", "cuda:-1"])
def test_a_device_this_machine_lacks_is_one_sentence(command, device, folders, tmp_path, caplog, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        device = "mps:9"  # present on this machine: an index it lacks instead
    device = _absent_device() if device == "absent-cuda" else device
    out = tmp_path / "out"
    args = [a.format(out=out, src=folders["src"], hybrid=folders["hybrid"]) for a in DEVICE_COMMANDS[command]]
    assert_refused([*args, "--device", device], caplog, capsys, words="device", absent=(out,), tmp_root=tmp_path)


@pytest.mark.parametrize("override", ["search.trials=abc", "search=5", "distill.lr=-1", "distill.steps=0",
                                      "eval.tasks=[nope]", "device=banana", f"device={_absent_device()}",
                                      "distill.micro_batch=0", "search.k=99", "search.k=0", "nonsense.key=1"])
@pytest.mark.parametrize("command", ["run", "ablate"])
def test_orchestrator_settings_are_checked_before_anything_is_written(command, override, folders, tmp_path, caplog,
                                                                      capsys):
    out = tmp_path / "run"
    assert_refused([command, "--preset", "smoke", "--set", f"model={folders['src']}", "--set", override,
                    "--out", out], caplog, capsys, absent=(out,), protect=(folders["src"],), tmp_root=tmp_path)


def test_eval_names_the_right_line_of_a_bad_data_file(folders, offline, tmp_path, caplog, capsys):
    good = json.dumps(GSM_ROW)
    (offline / "gsm8k_test.jsonl").write_text(f"{good}\n\n{good}\n{{\"question\": \n{good}\n")
    out = tmp_path / "eval"
    assert_refused(["eval", folders["src"], "--tasks", "gsm8k", "--data-dir", offline, "--out", out], caplog,
                   capsys, words="line 4", absent=(out,))


CRUX_ROW = {"code": "def f(x):\n    return x", "input": "1", "output": "1", "id": "sample_0"}


@pytest.mark.parametrize("task, line, words", [
    ("cruxeval", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "line 2 is not UTF-8 text"),
    ("cruxeval", json.dumps({**CRUX_ROW, "code": 5}).encode(), "line 2: the field code is int"),
    ("cruxeval", json.dumps({**CRUX_ROW, "output": "\udc80"}).encode(), "line 2: the field output holds a lone surrogate"),
    ("cruxeval", b"[1, 2, 3]", "line 2 is a list"),
    ("gsm8k", json.dumps({**GSM_ROW, "answer": "1 + 1 = 2, so two."}).encode(), "line 2: the answer does not end in '#### N'"),
    ("gsm8k", json.dumps({**GSM_ROW, "answer": "#### two"}).encode(), "line 2: the answer does not end in '#### N'"),
])
def test_a_data_file_with_a_bad_row_names_its_line_before_any_model_loads(task, line, words, folders, offline,
                                                                          tmp_path, caplog, capsys):
    good = json.dumps(CRUX_ROW if task == "cruxeval" else GSM_ROW).encode()
    name = "cruxeval.jsonl" if task == "cruxeval" else "gsm8k_test.jsonl"
    (offline / name).write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    out = tmp_path / "eval"
    assert_refused(["eval", folders["src"], "--tasks", task, "--data-dir", offline, "--out", out], caplog, capsys,
                   words=words, absent=(out,))


def test_n_shot_beyond_the_train_split_is_refused(folders, offline, tmp_path, caplog, capsys):
    out = tmp_path / "eval"  # the offline train split holds 4 examples
    assert_refused(["eval", folders["src"], "--tasks", "gsm8k", "--n-shot", "5", "--data-dir", offline, "--out", out],
                   caplog, capsys, words="--n-shot 5 asks for more examples than the GSM8K train split holds (4)",
                   absent=(out,))


def test_a_mixer_too_big_for_memory_is_refused_before_the_model_loads(folders, tmp_path, caplog, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("rad.models.convert.load_model", no_loading)
    out = tmp_path / "h"  # d_state 10^8: a 77 GB allocation 34 s into the run, before
    assert_refused(["convert", folders["src"], "--layers", "1", "--d-state", "100000000", "--out", out], caplog,
                   capsys, words="needs about 79.0 GiB on cpu", absent=(out,))


@contextlib.contextmanager
def _small_disk(root: Path, size: str):
    """A tmpfs of `size` mounted at `root` (root only); skips where mounting is not allowed."""
    root.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)],
                                            capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def test_a_full_disk_during_convert_is_one_sentence_and_leaves_nothing(folders, tmp_path, caplog, capsys):
    with _small_disk(tmp_path / "disk", "64k") as disk:
        out = disk / "hybrid"
        assert_refused(["convert", folders["src"], "--layers", "1", "--out", out], caplog, capsys,
                       words="but its disk has", absent=(out,))
        assert list(disk.iterdir()) == []  # not even a temporary folder


# ---------------------------------------------------------------- 4. a killed writer's leftovers


HANG_IN_ATOMIC_DIRECTORY = textwrap.dedent(
    """
    import sys, time
    from rad.utils.atomic import atomic_directory
    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 4096)
        print("ready", flush=True)
        time.sleep(120)
    """
)


def _kill_mid_write(dest: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HANG_IN_ATOMIC_DIRECTORY, str(dest)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()


def test_the_next_write_removes_what_a_killed_writer_left_and_nothing_else(tmp_path):
    from rad.utils.atomic import atomic_directory, temp_name

    _kill_mid_write(tmp_path / "hybrid")
    leftovers = list(tmp_path.glob(".tmp-hybrid.rad-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "weights.bin").is_file()
    # Not rad's to remove: a user's own .tmp- folder, an old-format name, and a live writer's temp (ours).
    strangers = [tmp_path / ".tmp-user-stuff", tmp_path / ".tmp-hybrid-123-abcdef12", tmp_path / temp_name("live")]
    for folder in strangers:
        folder.mkdir()
        (folder / "f").write_text("mine")
    with atomic_directory(tmp_path / "other") as tmp:
        (tmp / "a").write_text("ok")
    assert not leftovers[0].exists()
    assert all((folder / "f").read_text() == "mine" for folder in strangers)


def test_a_killed_checkpoint_write_is_removed_by_the_next_checkpoint(tmp_path):
    from rad.distill.checkpoint import list_checkpoints, save_checkpoint

    root = tmp_path / "checkpoints"
    _kill_mid_write(root / "step-0000005")
    assert list(root.glob(".tmp-*"))
    save_checkpoint(root, 6, {"w": torch.zeros(2)}, {}, {}, [{}], settings={}, data_position=0, train_sequences=1)
    assert [p.name for p in list_checkpoints(root)] == ["step-0000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000006"]


FULL_DISK_SCRIPT = """
import resource, signal, sys
from pathlib import Path
import torch
from rad.distill.checkpoint import save_checkpoint
from rad.errors import RadError
root = Path(sys.argv[1])
save_checkpoint(root, 1, {"w": torch.zeros(4)}, {}, {}, [{}], settings={}, data_position=0, train_sequences=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # every file write past 1 MiB fails, as on a full disk
try:
    save_checkpoint(root, 2, {"w": torch.zeros(1 << 20)}, {}, {}, [{}], settings={}, data_position=0, train_sequences=1)
except RadError as err:
    print("RadError:", err)
print("left:", sorted(p.name for p in root.iterdir()))
"""


@pytest.mark.parametrize("big", ["weights", "optimizer"])
def test_a_checkpoint_write_that_runs_out_of_space_is_one_sentence_and_keeps_the_last_checkpoint(tmp_path, big):
    script = FULL_DISK_SCRIPT if big == "weights" else FULL_DISK_SCRIPT.replace(
        '{"w": torch.zeros(1 << 20)}, {}', '{"w": torch.zeros(4)}, {"m": torch.zeros(1 << 20)}')
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoints")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RadError: Could not write" in proc.stdout and "free on its disk" in proc.stdout
    assert "left: ['step-0000001']" in proc.stdout  # the failed write left nothing behind; the last one stays


def test_free_space_is_checked_before_work():
    from rad.outputs import check_free_space

    check_free_space(Path(__file__).parent, 1, "A tiny job")
    with pytest.raises(RadError, match="needs about .* free; free some space"):
        check_free_space(Path(__file__).parent, 1 << 62, "A huge job")


def test_a_replacement_killed_between_its_two_renames_restores_the_old_folder(tmp_path):
    from rad.utils.atomic import atomic_write_text, temp_name

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    old = tmp_path / temp_name("hybrid", "old").replace(f"-{__import__('os').getpid()}-", f"-{dead_pid}-")
    old.mkdir()
    (old / "model.safetensors").write_text("the only complete copy")
    atomic_write_text(tmp_path / "note.txt", "next write")
    assert (tmp_path / "hybrid" / "model.safetensors").read_text() == "the only complete copy"
    assert not old.exists()


# ---------------------------------------------------------------- 5. a torn log.jsonl


def test_a_torn_last_log_line_is_dropped_and_real_corruption_named(tmp_path):
    from rad.ablate.metrics import read_curve
    from rad.distill.summary import Logs
    from rad.utils.jsonl import read_log

    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "eval", "step": s, "eval_kl": 1.0 / (s + 1)}) for s in range(4)]
    log.write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')  # killed mid-write
    assert [r["step"] for r in read_log(log)] == [0, 1, 2, 3]
    assert [p["step"] for p in read_curve(log)] == [0, 1, 2, 3]
    Logs(tmp_path, enabled=True, tensorboard=False, start_step=2)  # a resume from the step-2 checkpoint
    assert log.read_text().splitlines() == lines[:3]  # cut back to step 2, the torn line gone
    log.write_text(lines[0] + "\n{garbage\n" + lines[1] + "\n")
    for read in (read_log, read_curve, lambda p: Logs(tmp_path, enabled=True, tensorboard=False, start_step=1)):
        with pytest.raises(RadError, match="line 2 is corrupt"):
            read(log)
    log.write_text(lines[0] + "\n{garbage\n")  # a bad last line that did end with its newline: not a torn write
    with pytest.raises(RadError, match="line 2"):
        read_log(log)


# ---------------------------------------------------------------- the real process


@pytest.mark.slow  # the interpreter's torch import alone takes ~30 s on the shared 2-core machine
def test_a_real_process_prints_one_line_and_exits_2(folders, tmp_path):
    snapshot_before = snapshot(folders["hybrid"])
    proc = subprocess.run([sys.executable, "-m", "rad.cli", "distill", str(folders["hybrid"]), "--out",
                           str(folders["hybrid"])], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "itself" in lines[0] and "Traceback" not in proc.stderr
    assert snapshot(folders["hybrid"]) == snapshot_before


# ---------------------------------------------------------------- rad export


def test_export_refuses_bad_input_before_writing(folders, caplog, capsys, tmp_path):
    """Not a model, an existing --out (kept byte-identical), a folder as --out, a missing parent folder, a model
    whose RoPE llama.cpp cannot express (the tiny Llama uses llama3 scaling), a tokenizer GGUF that is no file, no
    known tokenizer: exit 2, one sentence, nothing half-written (no `.partial` left)."""
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    hybrid = folders["hybrid"]
    cases = [
        ([tmp_path / "nothing-here", "--out", tmp_path / "a.gguf"], "unknown model"),
        ([hybrid, "--out", existing], "already exists"),
        ([hybrid, "--out", tmp_path], "is a folder"),
        ([hybrid, "--out", tmp_path / "no" / "such" / "a.gguf"], "does not exist"),
        ([hybrid, "--out", tmp_path / "b.gguf", "--tokenizer-gguf", tmp_path / "none.gguf"], "not a file"),
        ([hybrid, "--out", tmp_path / "c.gguf"], "llama3"),
    ]
    for args, words in cases:
        assert_refused(["export", *args], caplog, capsys, words=words, protect=(existing,),
                       absent=(tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"))
    assert not list(tmp_path.glob(".*.partial"))
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal of an unknown --type
        main(["export", str(hybrid), "--out", str(tmp_path / "d.gguf"), "--type", "q4_k"])
    assert stop.value.code == 2 and not (tmp_path / "d.gguf").exists()


def test_export_refuses_a_model_without_a_known_tokenizer(tmp_path, caplog, capsys):
    tokenizer, source = word_tokenizer(), make_tiny("qwen2")
    source.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    assert_refused(["export", tmp_path / "src", "--out", tmp_path / "m.gguf"], caplog, capsys,
                   words="--tokenizer-gguf", absent=(tmp_path / "m.gguf",))


# ---------------------------------------------------------------- artefact fields are read with their declared type

LAYER_FIELDS = {"a string": '"13"', "a float": "[1.9]", "a bool": "[true]", "an object": '{"1": 2}',
                "Infinity": "[Infinity]", "a negative index": "[-1]", "a repeated index": "[1, 1]"}


@pytest.mark.parametrize("case", list(LAYER_FIELDS))
def test_a_coerced_search_result_is_refused_not_read_as_other_layers(case, folders, tmp_path, caplog, capsys):
    """`rad convert --layers-from` once read "13" as layers [1, 3], [1.9] as [1], true as 1, a dict's keys."""
    search = tmp_path / "search"
    search.mkdir()
    (search / "search.json").write_text('{"chosen_layers": ' + LAYER_FIELDS[case] + "}")
    assert_refused(["convert", folders["src"], "--layers-from", search, "--out", tmp_path / "h"], caplog, capsys,
                   words="is not a search result", absent=(tmp_path / "h",))


@pytest.mark.parametrize("change, words", [
    ({"converted_layers": "13"}, "valid list"),
    ({"num_layers": 2}, "are not the model's 2 layers"),
    ({"converted_layers": [1.0, 3]}, "valid integer"),
    ({"num_layers": True}, "valid integer"),
    ({"unknown_field": 1}, "unexpected field"),
])
def test_a_conversion_record_that_disagrees_is_refused(change, words, folders, tmp_path, caplog, capsys):
    hybrid = tmp_path / "hybrid"
    hybrid.mkdir()
    for path in folders["hybrid"].iterdir():
        (hybrid / path.name).write_bytes(path.read_bytes())
    record = json.loads((hybrid / "rad_conversion.json").read_text())
    (hybrid / "rad_conversion.json").write_text(json.dumps({**record, **change}))
    error = assert_refused(["distill", hybrid, "--out", tmp_path / "d", "--steps", "1"], caplog, capsys,
                           words="is not a rad conversion record", absent=(tmp_path / "d",))
    assert words in error


# ---------------------------------------------------------------- settings that passed validation and failed later


@pytest.mark.parametrize("make", [
    lambda: ConversionConfig(layers=[1], seed=2**32),
    lambda: ConversionConfig(layers=[1], seed=True),
    lambda: __import__("rad.distill", fromlist=["DistillConfig"]).DistillConfig(hybrid="h", out="o", seed=2**40),
    lambda: __import__("rad.decoding.speculative", fromlist=["SamplingConfig"]).SamplingConfig(seed=-1),
    lambda: __import__("rad.search", fromlist=["SearchConfig"]).SearchConfig(k=1, seed=2**32).validate(),
], ids=["convert", "convert bool", "distill", "sampling", "search"])
def test_a_seed_beyond_what_the_libraries_take_is_refused_by_every_config(make):
    with pytest.raises(RadError, match=r"seed must be a whole number from 0 to 4294967295"):
        make()


@pytest.mark.parametrize("override, words", [
    ("seed=99999999999", "seed must be a whole number from 0 to 4294967295"),
    ("distill.steps=true", "distill.steps in the run config is a number; got the yes/no value True"),
    ("search.trials=true", "search.trials in the run config is a number"),
])
def test_run_settings_that_failed_after_work_started_are_refused_at_load(override, words):
    from rad.pipeline import load_run_config

    with pytest.raises(RadError, match=re.escape(words)):
        load_run_config("smoke", None, [override])
    assert load_run_config("smoke", None, ["search.baselines=false"]).search.baselines is False  # a real yes/no


def test_a_yaml_key_given_twice_is_refused_not_dropped(tmp_path, caplog, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: smollm2-135m\ndistill: {steps: 4}\ndistill: {steps: 8}\n")
    error = assert_refused(["run", "--config", config, "--out", tmp_path / "out"], caplog, capsys,
                           words="the key 'distill' is given twice (line 3)", absent=(tmp_path / "out",))
    assert error.endswith(".")


# ---------------------------------------------------------------- weights checked before they are trusted


def _broken_checkpoint(folders, tmp_path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / how
    folder.mkdir()
    for path in folders["src"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.0.self_attn.q_proj.weight"
    if how == "fewer layers in config.json":
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 2
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "an int8 projection":
        tensors[key] = tensors[key].to(torch.int8)
    elif how == "a NaN weight":
        tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("how, words", [
    ("fewer layers in config.json", "does not use (e.g. model.layers.2."),
    ("an int8 projection", "stores model.layers.0.self_attn.q_proj.weight as I8"),
    ("a NaN weight", "NaN or infinite values in model.layers.0.self_attn.q_proj.weight"),
])
def test_a_checkpoint_whose_weights_cannot_be_trusted_is_refused(how, words, folders, tmp_path, caplog, capsys):
    """These converted '1 of 2 layers', an all-zero projection, or generated garbage with exit status 0."""
    broken = _broken_checkpoint(folders, tmp_path, how)
    assert_refused(["convert", broken, "--layers", "1", "--out", tmp_path / "h"], caplog, capsys, words=words,
                   absent=(tmp_path / "h",))


@pytest.mark.parametrize("command", ["distill", "align"])
def test_rows_longer_than_the_models_positions_are_refused_before_loading(command, folders, tmp_path, caplog,
                                                                          capsys):
    """`rad distill --seq-len 100000` on a 256-position model grew to 19 GB before the OOM killer stopped it."""
    args = [command, folders["hybrid"], "--seq-len", "100000", "--steps", "1", "--out", tmp_path / "d"]
    assert_refused(args, caplog, capsys, words="--seq-len 100000 is longer than", absent=(tmp_path / "d",))
