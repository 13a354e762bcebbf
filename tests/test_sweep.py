"""`rad sweep` on the real default model: a time limit stops it cleanly (exit 75) and the rerun continues; the
teacher is scored once for every k; claims.json agrees with the per-item files it summarises."""

import json

import pytest
import yaml

from rad.cli import main
from rad.errors import RadError
from rad.evaluate.runner import model_slug, read_items
from rad.evaluate.stats import wilson_interval
from rad.sweep import TEACHER_EVAL, load_sweep_config

FAST = ["ks=[2,3]", "distill.steps=1", "eval.limit=2", "eval.tasks=[gsm8k]", "eval.max_new_tokens=8",
        "speed_contexts=[32]", "search.trials=2"]


def _args(out, *extra):
    args = ["sweep", "--preset", "smoke", "--out", str(out)]
    for item in FAST:
        args += ["--set", item]
    return args + list(extra)


def test_sweep_stops_at_its_time_limit_resumes_and_summarises_the_per_item_files(default_model, tmp_path, caplog):
    out = tmp_path / "sweep"
    assert main(_args(out, "--max-minutes", "1e-6")) == 75  # stops before the first stage, nothing lost
    assert "run the same command again" in caplog.text and not (out / "k2" / "search").exists()
    assert main(_args(out)) == 0
    claims = json.loads((out / "claims.json").read_text())
    assert claims["ks"] == [2, 3] and set(claims["runs"]) == {"2", "3"}
    # The teacher is scored once, in the shared folder; each k's own eval folder holds the other three models.
    assert (out / TEACHER_EVAL / "teacher" / "gsm8k.jsonl").is_file()
    for k in (2, 3):
        assert not (out / f"k{k}" / "eval" / "teacher").exists()
        run = claims["runs"][str(k)]
        assert len(run["layers"]["searched"]) == k and len(run["layers"]["uniform"]) == k
        items = {role: read_items(out / (TEACHER_EVAL if role == "teacher" else f"k{k}/eval") / model_slug(role) /
                                  "gsm8k.jsonl") for role in run["models"]}
        for role, m in run["models"].items():
            correct = sum(bool(r["correct"]) for r in items[role].values())
            assert m["tasks"]["gsm8k"]["correct"] == correct and m["tasks"]["gsm8k"]["total"] == 2
            assert m["tasks"]["gsm8k"]["ci95"] == pytest.approx(list(wilson_interval(correct, 2)))
            assert m["bytes_per_token"] > 0 and m["tok_s"] > 0
        pairs = [("RAD student", "baseline student"), ("RAD student", "teacher"), ("baseline student", "teacher"),
                 ("RAD student", "draft (searched layers skipped)")]
        assert set(run["mcnemar"]) == {f"gsm8k: {a} vs {b}" for a, b in pairs}
        for a, b in pairs:
            test, left, right = run["mcnemar"][f"gsm8k: {a} vs {b}"], items[a], items[b]
            assert test["a_only"] == sum(left[i]["correct"] and not right[i]["correct"] for i in left)
            assert test["b_only"] == sum(right[i]["correct"] and not left[i]["correct"] for i in left)
        # Fewer attention layers, less KV per token: the draft holds (30 - k) / 30 of the teacher's.
        per_token = {role: m["bytes_per_token"] for role, m in run["models"].items()}
        assert per_token["draft (searched layers skipped)"] == pytest.approx(per_token["teacher"] * (30 - k) / 30)
    for png in ("accuracy_vs_k.png", "accuracy_vs_bytes.png"):
        assert (out / png).stat().st_size > 1000
    assert "Paired tests" in (out / "report.md").read_text()
    saved = yaml.safe_load((out / "sweep.yaml").read_text())
    assert saved["ks"] == [2, 3] and saved["model"] == "smollm2-135m"
    assert claims["pending"] == []
    # k=3 without its speed table is not complete: a sweep stopped at its time limit summarises k=2 alone.
    speed = out / "k3" / "speed.json"
    speed.rename(tmp_path / "speed.json")
    assert main(_args(out, "--max-minutes", "1e-6")) == 75
    partial = json.loads((out / "claims.json").read_text())
    assert partial["pending"] == [3] and partial["runs"] == {"2": claims["runs"]["2"]}
    assert "not yet complete: k = 3" in (out / "report.md").read_text()


def test_bad_sweep_settings_are_clear_errors(tmp_path):
    for override, message in (("ks=[]", "distinct positive"), ("ks=[4,4]", "distinct positive"),
                              ("max_minutes=0", "max_minutes must be positive"), ("kz=[1]", "Unknown setting kz")):
        with pytest.raises(RadError, match=message):
            load_sweep_config("smoke", overrides=[override])
    with pytest.raises(RadError, match="Unknown sweep preset|Unknown ablation preset|Unknown"):
        load_sweep_config("nope")
    claims = load_sweep_config("claims")
    assert claims.model == "qwen2.5-coder-0.5b" and claims.ks == [4, 8, 12]
    assert claims.run_config(8).search.k == 8 and claims.run_config(8).out.endswith("k8")
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    assert main(["sweep", "--preset", "smoke", "--out", str(tmp_path / "stranger")]) == 2
    assert (tmp_path / "stranger" / "notes.txt").read_text() == "mine"
