"""`rad run --preset smoke` end to end on the real default model, as on a fresh clone with nothing beside it
(no ../shared/data, an empty data cache, the hub offline), then again: every stage is skipped."""

import json
import logging

import pytest
import yaml

from rad.cli import main
from rad.errors import RadError
from rad.pipeline import load_run_config


def test_smoke_run_offline_writes_every_artifact_names_the_missing_task_and_resumes(tmp_path, default_model,
                                                                                    caplog, monkeypatch):
    monkeypatch.setenv("RAD_DATA_DIR", str(tmp_path / "no-shared-data"))
    monkeypatch.setenv("RAD_DATA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    inputs = json.loads((out / "inputs.json").read_text())
    assert inputs["tasks"] == ["gsm8k"] and list(inputs["dropped_tasks"]) == ["cruxeval"]  # GSM8K: the package
    search = json.loads((out / "search" / "search.json").read_text())
    assert len(search["chosen_layers"]) == 4
    for png in ("search/progress.png", "search/redundancy.png", "distill/rad/curves.png",
                "distill/baseline/curves.png"):
        assert (out / png).stat().st_size > 1000, png
    for student in ("distill/rad/student", "distill/baseline/student"):
        assert (out / student / "model.safetensors").is_file()
        record = json.loads((out / student / "rad_conversion.json").read_text())
        assert record["distillation"]["train"] == ("mixers" if "rad" in student else "all")
    rad_record = json.loads((out / "convert/rad/rad_conversion.json").read_text())
    assert rad_record["converted_layers"] == search["chosen_layers"] and rad_record["init"] == "rad"
    results = sorted(p.parent.name for p in (out / "eval").glob("*/results.json"))
    assert len(results) == 4
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["search"]["k"] == 4 and resolved["out"] == str(out)
    report = (out / "report.md").read_text()
    for needle in ("Why these layers", "Training curves", "| teacher |", "RAD student", "rad distill", "cache MiB",
                   "CRUXEval-O: not scored", "cruxeval.jsonl", "python-docs:pydoc_data.topics", "hub offline"):
        assert needle in report, needle
    rad_summary = json.loads((out / "distill" / "rad" / "summary.json").read_text())
    assert rad_summary["data"] == "python-docs:pydoc_data.topics"
    assert not list((out / "eval").glob("*/cruxeval.jsonl"))
    stamp = (out / "search" / "search.json").stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger="rad")
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    assert (out / "search" / "search.json").stat().st_mtime_ns == stamp
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) >= 5  # search, two conversions, two distillations


def test_bad_run_configs(tmp_path):
    with pytest.raises(RadError, match="Unknown preset"):
        load_run_config("nope")
    with pytest.raises(RadError, match="Unknown setting distill.stepz"):
        load_run_config("smoke", overrides=["distill.stepz=3"])
    assert load_run_config("smoke", overrides=["distill.steps=7"]).distill.steps == 7
    for override, message in (("search.trials=abc", "search.trials .* valid integer"),
                              ("search=5", "Setting search "), ("distill.lr=-1", "must be positive"),
                              ("distill.micro_batch=0", "micro_batch"), ("eval.tasks=[gsm9k]", "Unknown task"),
                              ("eval.on_missing_data=maybe", "skip or error"), ("search.objective=x", "objective"),
                              ("distill.lr.everything=1e-4", "trainable set")):
        with pytest.raises(RadError, match=message):
            load_run_config("smoke", overrides=[override])
    assert load_run_config("smoke", overrides=["distill.lr=1e-4"]).distill.lr["all"] == 1e-4  # YAML's 1e-4 string


def test_one_source_of_distillation_defaults():
    """`rad distill` alone, `rad run` and `rad ablate` train with the same lr / warm-up / alignment: before,
    `rad distill` defaulted to lr 1e-3, 1% warm-up and no alignment while `rad run` used 3e-4, 10% and 1.0."""
    from rad.ablate.config import load_ablate_config
    from rad.cli import build_parser
    from rad.distill.train import DEFAULT_LR, DistillConfig

    run = load_run_config("smoke").distill
    ablate = load_ablate_config("smoke").distill
    for train in ("mixers", "mixers+mlp", "all"):
        alone = DistillConfig(hybrid="h", out="o", train=train)  # what `rad distill` builds with no flags
        staged = run.stage_config("h", "o", train, seed=0, device=None)
        assert alone.lr == staged.lr == ablate.lr[train] == DEFAULT_LR[train]
        assert alone.warmup_ratio == staged.warmup_ratio == ablate.warmup_ratio == 0.1
        assert alone.loss.align == staged.loss.align == 1.0
    assert DistillConfig(hybrid="h", out="o", teacher="other").loss.align == 0.0  # other layers: no alignment
    args = build_parser().parse_args(["distill", "h", "--out", "o"])
    assert args.lr is None and args.warmup_ratio is None and args.align_weight is None  # the stage decides
