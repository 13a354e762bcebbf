"""`rad run --preset smoke` end to end on the real default model, as on a fresh clone with nothing beside it
(no ../shared/data, an empty data cache, the hub offline), then again: every stage is skipped."""

import json
import logging

import pytest
import yaml

from rad.cli import main
from rad.config import to_yaml
from rad.distill.summary import DistillSummary
from rad.errors import RadError
from rad.evaluate.runner import EvalResults
from rad.models.convert import ConversionRecord
from rad.pipeline import load_run_config
from rad.preflight import InputReport
from rad.search.report import SearchResult
from rad.stages.run_config import RunPaths, check_same_run
from rad.stages.speed import SpeedResult, SpeedRow


def resolved_contexts(out):
    return yaml.safe_load((out / "config.yaml").read_text())["speed_contexts"]


def test_smoke_run_offline_writes_every_artifact_names_the_missing_task_and_resumes(tmp_path, default_model,
                                                                                    caplog, monkeypatch):
    (tmp_path / "no-shared-data").mkdir()  # empty: what a clone without ../shared/data has
    monkeypatch.setenv("RAD_DATA_DIR", str(tmp_path / "no-shared-data"))
    monkeypatch.setenv("RAD_DATA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    inputs = InputReport.load(out)
    assert inputs.tasks == ["gsm8k"] and list(inputs.dropped_tasks) == ["cruxeval"]  # GSM8K: the package
    search = SearchResult.load(out / "search")
    assert len(search.layers) == 4
    for png in ("search/progress.png", "search/redundancy.png", "distill/rad/curves.png",
                "distill/baseline/curves.png"):
        assert (out / png).stat().st_size > 1000, png
    for student in ("distill/rad/student", "distill/baseline/student"):
        assert (out / student / "model.safetensors").is_file()
        record = ConversionRecord.load(out / student)
        assert record.distillation["train"] == ("mixers" if "rad" in student else "all")
    rad_record = ConversionRecord.load(out / "convert/rad")
    assert rad_record.converted_layers == search.layers and rad_record.init == "rad"
    results = [EvalResults.load(p.parent) for p in (out / "eval").glob("*/results.json")]
    assert len(results) == 4 and all(r.tasks["gsm8k"].total >= 1 for r in results)
    speed = SpeedResult.load(out)
    assert speed.contexts == resolved_contexts(out) and len(speed.rows) == 4 * len(speed.contexts)
    # Cache bytes per token: the draft keeps 26 of the teacher's 30 layers' KV; the RAD student
    # the same KV plus its mixers' constant state spread over the context.
    context = speed.contexts[0]
    per_token = {r.model: r.bytes_per_token for r in speed.rows if r.context == context}
    assert per_token["draft (searched layers skipped)"] == pytest.approx(per_token["teacher"] * 26 / 30)
    assert per_token["RAD student"] > per_token["draft (searched layers skipped)"] > 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["search"]["k"] == 4 and resolved["out"] == str(out)
    report = (out / "report.md").read_text()
    for needle in ("Why these layers", "Training curves", "| teacher |", "RAD student", "rad distill", "cache MiB",
                   "CRUXEval-O: not scored", "cruxeval.jsonl", "python-docs:pydoc_data.topics", "hub offline"):
        assert needle in report, needle
    rad_summary = DistillSummary.load(out / "distill" / "rad")
    assert rad_summary.data == "python-docs:pydoc_data.topics" and rad_summary.train == "mixers"
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


def test_every_shipped_preset_loads_under_its_own_settings_classes():
    """A typo in a preset (a key no settings class has, a value out of range) fails here, not minutes into a run."""
    from rad.ablate.config import load_ablate_config
    from rad.config import PRESETS_DIR
    from rad.model_aliases import ALIASES
    from rad.sweep import load_sweep_config

    loaded = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        kind, _, name = path.stem.partition("-") if path.stem.startswith(("ablate", "sweep")) else ("run", "", path.stem)
        load = {"run": load_run_config, "ablate": load_ablate_config, "sweep": load_sweep_config}[kind]
        loaded[path.stem] = load(name or "default")
    assert {"default", "smoke", "qwen", "paper", "sweep-claims", "ablate-smoke"} <= set(loaded)
    for stem, config in loaded.items():
        assert config.model in ALIASES or "/" in config.model, stem  # an embedded alias or a hub id
    qwen = loaded["qwen"]
    assert qwen.model == loaded["sweep-claims"].model and qwen.search.k == 4
    assert qwen.distill.seq_len == loaded["sweep-claims"].distill.seq_len  # the claims recipe, fewer steps


def test_one_source_of_distillation_defaults():
    """`rad distill` alone, `rad run` and `rad ablate` train with the same lr / warm-up / alignment: before,
    `rad distill` defaulted to lr 1e-3, 1% warm-up and no alignment while `rad run` used 3e-4, 10% and 1.0."""
    from rad.ablate.config import load_ablate_config
    from rad.cli import build_parser
    from rad.distill.config import DEFAULT_LR, DistillConfig

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


def test_a_run_folder_is_continued_only_under_its_own_settings(tmp_path, caplog):
    out = tmp_path / "run"
    config = load_run_config("smoke", overrides=[f"out={out}"])
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(config))
    (out / "search").mkdir()  # a stage has started here
    paths = RunPaths(out)
    check_same_run(config, paths)  # the same settings: continued
    # What does not change a finished stage may change (the evaluation checks its own per-item identity).
    for override in ("eval.limit=3", "device=cpu", "speed_contexts=[64]", "distill.save_every=1",
                     "distill.eval_every=1"):
        check_same_run(load_run_config("smoke", overrides=[f"out={out}", override]), paths)
    for override, named in (("distill.lr.mixers=1e-3", "distill.lr.mixers"), ("distill.steps=99", "distill.steps"),
                            ("search.trials=5", "search.trials"), ("seed=3", "seed"), ("model=qwen2.5-coder-0.5b",
                                                                                     "model")):
        with pytest.raises(RadError, match=rf"The run in .* was made with other settings \({named} .*another --out"):
            check_same_run(load_run_config("smoke", overrides=[f"out={out}", override]), paths)
    # Through the CLI: exit 2 before any input is resolved or anything is written.
    stamp = (out / "config.yaml").stat().st_mtime_ns
    caplog.clear()
    assert main(["run", "--preset", "smoke", "--out", str(out), "--set", "distill.steps=99"]) == 2
    assert "distill.steps" in caplog.text and "Traceback" not in caplog.text
    assert (out / "config.yaml").stat().st_mtime_ns == stamp and sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "search"]


def test_speed_json_round_trips_reads_the_old_layout_and_a_malformed_one_is_a_clear_error(tmp_path):
    speed = SpeedResult([256], [SpeedRow(256, "teacher", 50.0, 1.5), SpeedRow(256, "RAD student", 60.0, 0.9)])
    speed.save(tmp_path)
    assert SpeedResult.load(tmp_path) == speed
    (tmp_path / "speed.json").write_text(json.dumps([{"context": 256, "model": "teacher", "tok_s": 50.0,
                                                      "cache_MiB": 1.5}]))  # as an older rad wrote it
    assert SpeedResult.load(tmp_path) == SpeedResult([256], [SpeedRow(256, "teacher", 50.0, 1.5)])
    (tmp_path / "speed.json").write_text('{"rows": []}')
    with pytest.raises(RadError, match="is not a rad speed table .*delete it"):
        SpeedResult.load(tmp_path)
