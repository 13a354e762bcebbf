"""Evaluation split across processes (`rad eval --shard i/n`, or RANK/WORLD_SIZE under accelerate launch): the same
per-item verdicts and results.json as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rad.cli import main
from rad.errors import RadError
from rad.evaluate import EvalConfig
from rad.evaluate.runner import EvalResults, evaluate_model
from rad.evaluate.shards import Shard
from rad.models.loading import LoadedModel
from tests.test_evaluate import tiny_hybrid, tiny_tokenizer  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "finished_at")  # when an item was made, not what it is


def _items(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in records}


def test_shards_are_parsed_and_checked():
    assert Shard.parse("1/3") == Shard(1, 3) and Shard.parse(" 0 / 1 ").whole
    assert [i for i in range(7) if Shard(1, 3).owns(i)] == [1, 4]
    for bad, message in [("3/2", "does not exist"), ("2/2", "does not exist"), ("0/0", "does not exist"),
                         ("1", "takes i/n"), ("a/b", "takes i/n"), ("-1/2", "takes i/n")]:
        with pytest.raises(RadError, match=message):
            Shard.parse(bad)
    assert Shard.from_launcher({"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    assert Shard.from_launcher({}) == Shard(0, 1)
    with pytest.raises(RadError, match="whole numbers"):
        Shard.from_launcher({"RANK": "x", "WORLD_SIZE": "2"})


def test_bad_shards_exit_2_before_any_model_loads(tmp_path, caplog, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rad.evaluate.runner.load_model", no_loading)
    base = ["eval", "smollm2-135m", "--tasks", "gsm8k", "--out", str(tmp_path / "e")]
    assert main([*base, "--shard", "3/2"]) == 2
    assert main([*base, "--shard", "0/2", "--overwrite"]) == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*base, "--shard", "0/2"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("--shard 3/2 does not exist" in e for e in errors)
    assert any("--overwrite cannot be sharded" in e for e in errors)
    assert any("inside a launcher" in e for e in errors)


def test_two_shards_write_what_one_process_writes(tiny_hybrid, tiny_tokenizer, tmp_path):  # noqa: F811
    loaded = LoadedModel(tiny_hybrid, tiny_tokenizer, source="tiny-hybrid", path=None)
    common = dict(tasks=["gsm8k"], max_new_tokens=6, chat=False, limit=7, batch_size=3)
    whole = evaluate_model(loaded, EvalConfig(out=str(tmp_path / "one"), **common))
    assert whole.complete and whole.tasks["gsm8k"].generated == 7

    out = tmp_path / "two"
    folder = out / "tiny-hybrid"
    first = evaluate_model(loaded, EvalConfig(out=str(out), shard=Shard(0, 2), **common))
    assert not first.complete and first.tasks["gsm8k"].total == 4  # items 0, 2, 4, 6
    assert (folder / "gsm8k.shard-0-of-2.jsonl").is_file() and not (folder / "gsm8k.jsonl").exists()
    assert "gsm8k" not in EvalResults.load(folder).tasks  # nothing partial is reported as a result
    second = evaluate_model(loaded, EvalConfig(out=str(out), shard=Shard(1, 2), **common))
    assert second.complete and second.tasks["gsm8k"].generated == 3  # items 1, 3, 5; then the merge
    assert not list(folder.glob("gsm8k.shard-*"))  # merged into gsm8k.jsonl

    one, two = tmp_path / "one" / "tiny-hybrid" / "gsm8k.jsonl", folder / "gsm8k.jsonl"
    assert list(_items(two)) == list(_items(one))  # the same items, in the same order
    assert _items(two) == _items(one)  # the same prompts, completions and verdicts
    assert EvalResults.load(folder).tasks == EvalResults.load(tmp_path / "one" / "tiny-hybrid").tasks
    # A later unsharded run resumes from the merged file, generating nothing.
    again = evaluate_model(loaded, EvalConfig(out=str(out), **common))
    assert again.tasks["gsm8k"].generated == 0 and again.tasks["gsm8k"].total == 7


def _eval_cmd(out: Path, *extra: str) -> list[str]:
    return ["-m", "rad.cli", "eval", "smollm2-135m", "--tasks", "gsm8k,passkey", "--limit", "4",
            "--max-new-tokens", "24", "--passkey-lengths", "256", "--passkey-depths", "0,50,100",
            "--passkey-repeats", "1", "--batch-size", "1", "--out", str(out), "--device", "cpu",
            "--dtype", "float32", *extra]


@pytest.mark.slow
def test_two_processes_and_accelerate_launch_match_one_process(default_model, tmp_path):
    del default_model  # builds the safetensors cache the processes load
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=900)
    one = subprocess.run([sys.executable, *_eval_cmd(tmp_path / "one")], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    procs = [subprocess.Popen([sys.executable, *_eval_cmd(tmp_path / "two", "--shard", f"{i}/2")], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu_2proc.yaml"),
         "--main_process_port", "29533", *_eval_cmd(tmp_path / "launched")], **run)
    assert launched.returncode == 0, launched.stderr[-3000:]

    reference = tmp_path / "one" / "smollm2-135m"
    for out in ("two", "launched"):
        folder = tmp_path / out / "smollm2-135m"
        for task in ("gsm8k", "passkey"):
            assert _items(folder / f"{task}.jsonl") == _items(reference / f"{task}.jsonl"), (out, task)
        assert EvalResults.load(folder).tasks == EvalResults.load(reference).tasks
        assert (tmp_path / out / "comparison.md").read_text() == (tmp_path / "one" / "comparison.md").read_text()
        assert (tmp_path / out / "passkey_recall.json").is_file()
