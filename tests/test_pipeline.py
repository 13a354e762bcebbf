"""`rad run --preset smoke` end to end on the real default model, then again: every stage is skipped."""

import json
import logging

import pytest
import yaml

from rad.cli import main
from rad.errors import RadError
from rad.pipeline import load_run_config


def test_smoke_run_writes_every_artifact_and_resumes(tmp_path, default_model, caplog):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
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
    for needle in ("Why these layers", "Training curves", "| teacher |", "RAD student", "rad distill", "cache MiB"):
        assert needle in report, needle
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
