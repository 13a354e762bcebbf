"""`rad ablate`: every arm of the grid on a tiny model, what each arm's artifacts say, resume, bad input,
the steps-to-baseline rule on hand-made curves, and a short run on the real default model through the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rad.ablate import (
    AblateConfig,
    AblateDistill,
    AblateEval,
    Arm,
    convergence,
    load_ablate_config,
    read_curve,
    run_ablation,
    steps_to_reach,
)
from rad.ablate.results import AblateSummary, ArmResult
from rad.cli import main
from rad.distill import DataConfig, build_data, kl_divergence
from rad.errors import RadError
from rad.evaluate.runner import EvalResults
from rad.models.convert import ConversionRecord
from rad.models.loading import load_model
from rad.models.mixers.mamba2 import RAD_GATE_GAIN
from rad.models.skip import skip_attention
from rad.search.report import SearchResult
from rad.stages.run_config import RunConfig
from tests.conftest import make_tiny


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: 2 threads against another process thrash
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, default_model):
    """A tiny 4-layer Llama with the real tokenizer (vocab 49152), saved as a model folder, and some data."""
    root = tmp_path_factory.mktemp("tiny_ablate")
    make_tiny("llama", vocab_size=49152).save_pretrained(root / "src")
    default_model.tokenizer.save_pretrained(root / "src")
    lines = [json.dumps({"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}.\n#### "
                         f"{2 * i + 1}"}) for i in range(60)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _tiny_config(tiny_src, out, **kw) -> AblateConfig:
    # fp32 whatever the CPU: the checks below compare arms exactly (step 0 is the same init for both trainable sets,
    # which bf16 storage of the frozen weights perturbs in the 4th digit; bf16 is tested in tests/test_distill.py).
    distill = AblateDistill(steps=3, seq_len=32, micro_batch=2, eval_every=1, eval_sequences=4, save_every=2,
                            data=str(tiny_src / "data.jsonl"), eval_examples=6, max_examples=None, precision="fp32")
    base = dict(model=str(tiny_src / "src"), out=str(out), k=2, searched_layers=[0, 2], device="cpu",
                progress=False, distill=distill, eval=AblateEval(tasks=[]))
    base.update(kw)
    return AblateConfig(**base)


def _rename(key: str) -> str:  # source -> Bamba names (written out here, not imported from the converter)
    return (key.replace(".post_attention_layernorm.", ".pre_ff_layernorm.").replace(".mlp.", ".feed_forward.")
            .replace("model.norm.", "model.final_layernorm."))


# ---------------------------------------------------------------- the steps-to-baseline rule


def test_steps_to_reach_and_speedup_on_hand_made_curves():
    baseline = [(0, 1.0), (10, 0.6), (20, 0.5), (30, 0.4)]
    assert steps_to_reach(baseline, 0.4) == 30  # equality counts
    assert steps_to_reach([(20, 0.3), (0, 0.9), (10, 0.35)], 0.4) == 10  # order of the points does not matter
    assert steps_to_reach([(0, 2.0), (10, 1.5), (30, 0.41)], 0.4) is None
    assert steps_to_reach([], 1.0) is None

    def curve(points):
        return [{"step": s, "eval_kl": kl} for s, kl in points]

    result = convergence({"base": curve(baseline), "fast": curve([(0, 0.5), (10, 0.4), (20, 0.3), (30, 0.2)]),
                          "never": curve([(0, 2.0), (10, 1.5), (30, 0.41)]),
                          "init": curve([(0, 0.3), (10, 0.5), (30, 0.45)])}, "base")
    assert result["target_kl"] == 0.4 and result["baseline_steps"] == 30
    arms = result["arms"]
    assert arms["base"] == {"steps_to_baseline_kl": 30, "speedup": 1.0, "reached_at_init": False}
    assert arms["fast"] == {"steps_to_baseline_kl": 10, "speedup": 3.0, "reached_at_init": False}
    assert arms["never"] == {"steps_to_baseline_kl": None, "speedup": None, "reached_at_init": False}
    assert arms["init"] == {"steps_to_baseline_kl": 0, "speedup": None, "reached_at_init": True}
    # A baseline that dips below its own final value earlier is counted by the same rule.
    bumpy = convergence({"b": curve([(0, 1.0), (10, 0.3), (20, 0.5)]), "a": curve([(0, 1.0), (5, 0.5)])}, "b")
    assert bumpy["baseline_steps"] == 10 and bumpy["arms"]["a"]["speedup"] == 2.0
    # A baseline already at its final KL before training: no speed-up can be stated for anyone.
    flat = convergence({"b": curve([(0, 0.5), (10, 0.6), (20, 0.5)]), "a": curve([(0, 0.9), (10, 0.2)])}, "b")
    assert flat["target_kl"] == 0.5 and flat["baseline_steps"] == 0
    assert flat["arms"]["b"] == {"steps_to_baseline_kl": 0, "speedup": None, "reached_at_init": True}
    assert flat["arms"]["a"] == {"steps_to_baseline_kl": 10, "speedup": None, "reached_at_init": False}
    with pytest.raises(ValueError, match="no held-out evaluations"):
        convergence({"b": [], "a": curve([(0, 1.0)])}, "b")


def test_read_curve_keeps_one_point_per_step(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"kind": "eval", "step": 0, "eval_kl": 0.9}, {"kind": "train", "step": 1, "loss": 3.0},
            {"kind": "eval", "step": 0, "eval_kl": 0.8}, {"kind": "eval", "step": 2, "eval_kl": 0.5},
            {"kind": "eval", "step": 1, "eval_kl": 0.7}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_curve(log) == [{"step": 0, "eval_kl": 0.8}, {"step": 1, "eval_kl": 0.7}, {"step": 2, "eval_kl": 0.5}]
    assert read_curve(tmp_path / "missing.jsonl") == []


# ---------------------------------------------------------------- the whole grid on a tiny model


def test_all_eight_arms_on_a_tiny_model_then_resume(tiny_src, tmp_path, caplog):
    out = tmp_path / "abl"
    config = _tiny_config(tiny_src, out)
    result = run_ablation(config)
    s = result.summary
    names = [f"{lay}-{init}-{train}" for lay in ("searched", "uniform") for init in ("rad", "mil")
             for train in ("mixers", "all")]
    assert s.order == names and set(result.statuses.values()) == {"ran"}
    assert s.layer_sets == {"searched": [0, 2], "uniform": [1, 3]} and not s.layer_sets_coincide
    assert s.baseline == "uniform-mil-all"
    for name in ("ablate.json", "config.yaml", "report.md"):
        assert (out / name).is_file(), name
    assert (out / "kl_curves.png").stat().st_size > 5000
    assert AblateSummary.load(out) == s and s.arms.keys() == set(names)
    assert yaml.safe_load((out / "config.yaml").read_text())["searched_layers"] == [0, 2]

    src = load_file(str(tiny_src / "src" / "model.safetensors"))
    eval_rows = build_data(DataConfig(spec=str(tiny_src / "data.jsonl"), seq_len=32, eval_examples=6),
                           load_model(str(tiny_src / "src")).tokenizer).eval
    for name in names:
        arm, folder = s.arms[name], out / "arms" / name
        arm_spec = Arm.parse(name)
        lay, init, train = arm_spec.layers, arm_spec.init, arm_spec.train
        layers = [0, 2] if lay == "searched" else [1, 3]
        record = ConversionRecord.load(folder / "hybrid")
        assert (record.converted_layers, record.init) == (layers, init), name
        assert json.loads((folder / "distill" / "config.json").read_text())["train"] == train
        assert arm.lr == RunConfig().distill.lr[train]  # rad run's learning rate for that trainable set
        # The same held-out curve points for every arm: step 0 (before training) to the last step.
        assert [p.step for p in arm.curve] == [0, 1, 2, 3]
        assert arm.final_kl == arm.curve[-1].eval_kl and arm.kl_at_init == arm.curve[0].eval_kl
        assert {p.eval_tokens for p in arm.curve} == {s.arms[names[0]].curve[0].eval_tokens}
        assert not (folder / "distill" / "checkpoints").exists()  # removed once the student is saved
        hybrid = load_file(str(folder / "hybrid" / "model.safetensors"))
        gains = [hybrid[f"model.layers.{i}.mamba.norm.weight"] for i in layers]
        assert all(bool((w == RAD_GATE_GAIN).all()) for w in gains) == (init == "rad"), name  # the rad init's gain
        student = load_file(str(folder / "distill" / "student" / "model.safetensors"))
        assert any(not torch.equal(student[k], hybrid[k]) for k in student if ".mamba." in k), name  # mixers trained
        shared = {_rename(k): v for k, v in src.items() if _rename(k) in student}
        assert "model.embed_tokens.weight" in shared and len(shared) > 20
        changed = [k for k, v in shared.items() if not torch.equal(student[k], v)]
        if train == "mixers":
            assert changed == [], (name, changed[:3])  # every non-mixer weight bit-identical to the teacher's
        else:
            assert "model.embed_tokens.weight" in changed and len(changed) > len(shared) // 2, name
    # Step 0 is the init: the same for both trainable sets; for `rad` it is the draft model's KL.
    for lay in ("searched", "uniform"):
        for init in ("rad", "mil"):
            a, b = s.arms[f"{lay}-{init}-mixers"], s.arms[f"{lay}-{init}-all"]
            assert a.curve[0] == b.curve[0]
    teacher = load_model(str(tiny_src / "src"), device="cpu", dtype="float32").model
    rows = eval_rows.rows(list(range(min(4, len(eval_rows)))))
    with torch.no_grad():
        t_logits = teacher(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
        with skip_attention(teacher, [0, 2]):
            d_logits = teacher(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
    draft_kl = kl_divergence(d_logits[:, :-1], t_logits[:, :-1], rows.loss_mask[:, 1:].float()).item()
    assert s.arms["searched-rad-mixers"].kl_at_init == pytest.approx(draft_kl, rel=1e-4)
    assert s.arms["searched-mil-mixers"].kl_at_init != pytest.approx(draft_kl, rel=1e-2)
    # Steps to the baseline's final KL, checked against the rule's definition on the recorded curves (the
    # rule itself is checked on hand-made curves above): the first evaluated step at or below the target.
    target = s.arms["uniform-mil-all"].final_kl
    assert s.baseline_final_kl == target
    assert s.baseline_steps == s.arms["uniform-mil-all"].steps_to_baseline_kl is not None
    for name in names:
        arm = s.arms[name]
        steps, kls = [p.step for p in arm.curve], [p.eval_kl for p in arm.curve]
        reached = arm.steps_to_baseline_kl
        if reached is None:
            assert min(kls) > target, name
            assert arm.speedup is None
            continue
        at = steps.index(reached)
        assert kls[at] <= target and all(kl > target for kl in kls[:at]), (name, kls, target)
        assert arm.reached_at_init == (reached == 0)
        if reached and s.baseline_steps:
            assert arm.speedup == pytest.approx(s.baseline_steps / reached)
        else:
            assert arm.speedup is None
    report = (out / "report.md").read_text()
    for needle in ("| arm |", "uniform-mil-all** (baseline)", "kl_curves.png", f"rad ablate --config {out}",
                   "searched layers: **0, 2**", "steps to baseline KL"):
        assert needle in report, needle

    # A second run skips every arm: nothing is rewritten.
    stamps = {n: (out / "arms" / n / "distill" / "student" / "model.safetensors").stat().st_mtime_ns for n in names}
    caplog.clear()
    caplog.set_level(logging.INFO, logger="rad")
    again = run_ablation(config)
    assert set(again.statuses.values()) == {"skipped"}
    skipped = {r.getMessage().split()[1].rstrip(":") for r in caplog.records if r.getMessage().endswith("done, skipped")}
    assert skipped == set(names)
    assert stamps == {n: (out / "arms" / n / "distill" / "student" / "model.safetensors").stat().st_mtime_ns
                      for n in names}
    assert again.summary.arms["searched-rad-all"].curve == s.arms["searched-rad-all"].curve
    # An arm cut short (no student, no result yet) is redone in its folder; the others stay skipped.
    shutil.rmtree(out / "arms" / "searched-rad-all" / "distill" / "student")
    (out / "arms" / "searched-rad-all" / "result.json").unlink()
    third = run_ablation(config)
    assert third.statuses["searched-rad-all"] == "resumed"
    assert {v for k, v in third.statuses.items() if k != "searched-rad-all"} == {"skipped"}
    assert third.summary.arms["searched-rad-all"].curve == s.arms["searched-rad-all"].curve
    # The same folder with other training settings is refused, not silently mixed.
    with pytest.raises(RadError, match="other settings"):
        run_ablation(_tiny_config(tiny_src, out, distill=AblateDistill(steps=4, seq_len=32, eval_every=1,
                                                                       data=str(tiny_src / "data.jsonl"))))


def test_searched_equal_to_uniform_runs_each_pair_once(tiny_src, tmp_path, caplog):
    search = tmp_path / "search"
    search.mkdir()
    (search / "search.json").write_text(json.dumps({"chosen_layers": [3, 1]}))
    caplog.set_level(logging.INFO, logger="rad")
    out = tmp_path / "same"
    result = run_ablation(_tiny_config(tiny_src, out, searched_layers=None, searched_from=str(search),
                                       inits=["mil"], train=["all"],
                                       eval=AblateEval(tasks=["gsm8k"], limit=2, max_new_tokens=4)))
    s = result.summary
    assert s.layer_sets["searched"] == [1, 3] and s.layer_sets_coincide
    assert result.statuses == {"uniform-mil-all": "ran", "searched-mil-all": "same as uniform-mil-all"}
    assert not (out / "arms" / "searched-mil-all").exists()
    assert s.arms["searched-mil-all"].curve == s.arms["uniform-mil-all"].curve
    assert any("coincides" in r.getMessage() for r in caplog.records)
    assert "The searched layers are the uniform layers" in (out / "report.md").read_text()
    assert "chosen by the search in" in s.searched_source
    # Task scores of the arm's student and of the teacher, with their counts, through the evaluate runner.
    for scores in (s.arms["uniform-mil-all"].scores, s.teacher_scores):
        assert scores["gsm8k"].total == 2 and 0 <= scores["gsm8k"].correct <= 2
    items = (out / "eval" / "uniform-mil-all" / "gsm8k.jsonl").read_text().splitlines()
    assert len(items) == 2
    assert EvalResults.load(out / "eval" / "teacher").tasks["gsm8k"] == s.teacher_scores["gsm8k"]
    assert "| gsm8k |" in (out / "report.md").read_text()


def test_without_searched_layers_the_search_runs_into_out(tiny_src, tmp_path):
    from rad.search.config import SearchSettings

    out = tmp_path / "searching"
    config = _tiny_config(tiny_src, out, searched_layers=None, layers=["searched"], inits=["rad"], train=["mixers"],
                          search=SearchSettings(objective="agreement", trials=3, max_new_tokens=4, prompts=1,
                                                baselines=False))
    s = run_ablation(config).summary
    chosen = SearchResult.load(out / "search").layers
    assert s.layer_sets["searched"] == sorted(chosen) and len(chosen) == 2
    assert s.searched_source == f"chosen by the search in {out / 'search'}"
    assert s.order == ["searched-rad-mixers", "uniform-mil-all"]
    record = ConversionRecord.load(out / "arms" / "searched-rad-mixers" / "hybrid")
    assert record.converted_layers == sorted(chosen)


# ---------------------------------------------------------------- bad input


def test_bad_ablation_settings_are_clear_errors(tiny_src, tmp_path):
    with pytest.raises(RadError, match="Unknown layer set 'random' in layers"):
        AblateConfig(layers=["searched", "random"])
    with pytest.raises(RadError, match="Unknown init 'xyz' in inits"):
        load_ablate_config("smoke", overrides=["inits=[rad,xyz]"])
    with pytest.raises(RadError, match="Unknown trainable set 'mlp' in train"):
        AblateConfig(train=["mlp"])
    with pytest.raises(RadError, match="Bad arm 'searched-zero-mixers'"):
        AblateConfig(extra_arms=["searched-zero-mixers"])
    with pytest.raises(RadError, match="extra_arms lists an arm twice"):
        AblateConfig(extra_arms="searched-rad-zero-in-proj-all,searched-rad-zero-in-proj-all")
    extra = AblateConfig(extra_arms=["searched-rad-zero-in-proj-mixers", "uniform-mil-all"]).arms()
    assert extra[-1] == Arm("searched", "rad-zero-in-proj", "mixers") and len(extra) == 9  # the grid has uniform-mil-all
    with pytest.raises(RadError, match="Unknown init 'foo' in baseline.init"):
        load_ablate_config("smoke", overrides=["baseline.init=foo"])
    with pytest.raises(RadError, match="Unknown setting distill.stepz in the ablation config"):
        load_ablate_config("smoke", overrides=["distill.stepz=3"])
    with pytest.raises(RadError, match="Unknown ablation preset"):
        load_ablate_config("nope")
    with pytest.raises(RadError, match="k must be a positive"):
        AblateConfig(k=0)
    with pytest.raises(RadError, match="searched_layers has 1 layers but k = 2"):
        AblateConfig(k=2, searched_layers=[3])
    with pytest.raises(RadError, match="k = 5 is out of range"):
        run_ablation(_tiny_config(tiny_src, tmp_path / "k", k=5, searched_layers=None))
    searched = tmp_path / "searched"  # beside the outputs: an --out inside an input folder is refused
    searched.mkdir()
    with pytest.raises(RadError, match="has no search.json"):
        run_ablation(_tiny_config(tiny_src, tmp_path / "s", searched_layers=None, searched_from=str(searched)))
    (searched / "search.json").write_text(json.dumps({"chosen_layers": [0, 1, 2]}))
    with pytest.raises(RadError, match=r"are 3, not k = 2"):
        run_ablation(_tiny_config(tiny_src, tmp_path / "n", searched_layers=None, searched_from=str(searched)))
    c = load_ablate_config("smoke", overrides=["distill.lr.all=1e-4", "layers=uniform"])
    assert c.distill.lr["all"] == 1e-4 and c.distill.lr["mixers"] == RunConfig().distill.lr["mixers"] and c.layers == ["uniform"]
    assert main(["ablate", "--preset", "smoke", "--set", "train=[everything]"]) == 2


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_two_arms_on_the_default_model_through_the_cli(default_model, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} times {b}?",
                                        "answer": f"{a} times {b} is {a * b}. The answer is {a * b}."}) + "\n"
                            for a in range(2, 12) for b in range(3, 7)))
    out = tmp_path / "abl"
    sets = ["searched_layers=[8,14,20,26]", "layers=[searched]", "inits=[rad]", "train=[mixers]", "device=cpu",
            "progress=false", "distill.steps=2", "distill.eval_every=1", "distill.eval_sequences=2",
            "distill.seq_len=32", "distill.micro_batch=2", "distill.save_every=0", f"distill.data={data}",
            "distill.eval_examples=4", "distill.max_examples=null"]
    argv = ["ablate", "--preset", "smoke", "--out", str(out)]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "searched-rad-mixers" in printed and f"Report: {out / 'report.md'}" in printed
    s = AblateSummary.load(out)
    assert s.order == ["searched-rad-mixers", "uniform-mil-all"]  # the baseline is added to the grid
    assert s.layer_sets == {"searched": [8, 14, 20, 26], "uniform": [6, 14, 21, 29]}
    rad, base = s.arms["searched-rad-mixers"], s.arms["uniform-mil-all"]
    assert [p.step for p in rad.curve] == [0, 1, 2] == [p.step for p in base.curve]
    assert rad.trainable_parameters < 0.2 * rad.total_parameters
    assert base.trainable_parameters == base.total_parameters
    assert s.config["distill"]["align_weight"] == 1.0 and s.versions["rad"]
    assert (out / "kl_curves.png").stat().st_size > 5000
    assert "| searched-rad-mixers |" in (out / "report.md").read_text()


# ---------------------------------------------------------------- typed artefacts and resume identity


def test_ablate_artefacts_round_trip_and_malformed_files_are_clear_errors(tmp_path):
    from rad.ablate.results import ArmSummary
    from rad.distill.summary import EvalPoint
    from rad.evaluate.runner import TaskScore

    curve = [EvalPoint(0, 0.5, 9.0, 8.0, 0.7, 100), EvalPoint(2, 0.3, 8.5, 8.0, 0.8, 100)]
    arm = ArmResult("uniform-mil-all", "uniform", [1, 3], "mil", "all", 2e-4, 10, 20, "data.jsonl", curve, 0.5, 0.3,
                    2, {"gsm8k": TaskScore(0.5, 1, 2, (0.1, 0.9), limit=2)}, {"distill_s": 1.0}, str(tmp_path),
                    {"layers": [1, 3]}, {"tasks": ["gsm8k"]})
    arm.save(tmp_path)
    raw = json.loads((tmp_path / "result.json").read_text())
    assert raw["curve"][1] == {"step": 2, "eval_kl": 0.3, "eval_ppl": 8.5, "teacher_ppl": 8.0,
                               "eval_top1_agreement": 0.8, "eval_tokens": 100}  # the layout of before
    assert ArmResult.load(tmp_path) == arm
    summary = AblateSummary("m", 4, 2, {"searched": [1, 3], "uniform": [1, 3]}, "given", True, arm.name, 0.3, 2,
                            [arm.name], {arm.name: ArmSummary(**vars(arm), steps_to_baseline_kl=2, speedup=1.0)},
                            {}, {arm.name: "ran"}, {}, {"total_s": 1.0}, "rad ablate", {"seed": 0}, {"rad": "0"})
    summary.save(tmp_path)
    assert AblateSummary.load(tmp_path) == summary
    (tmp_path / "result.json").write_text('{"name": "x"}')
    with pytest.raises(RadError, match="is not a rad ablation arm result .*delete it"):
        ArmResult.load(tmp_path)
    (tmp_path / "ablate.json").write_text("[1, 2]")
    with pytest.raises(RadError, match="is not a rad ablation summary .*re-run `rad ablate"):
        AblateSummary.load(tmp_path)


def test_an_arm_refuses_a_teacher_remade_at_the_same_path(tiny_src, tmp_path):
    model = tmp_path / "teacher"
    shutil.copytree(tiny_src / "src", model)
    out = tmp_path / "abl"
    config = _tiny_config(tiny_src, out, model=str(model), layers=["uniform"], inits=["mil"], train=["all"],
                          distill=AblateDistill(steps=1, seq_len=32, micro_batch=2, eval_every=1, eval_sequences=2,
                                                save_every=1, data=str(tiny_src / "data.jsonl"), eval_examples=6))
    first = run_ablation(config)
    assert first.statuses == {"uniform-mil-all": "ran"}
    make_tiny("llama", seed=7, vocab_size=49152).save_pretrained(model)  # other weights, same path and shape
    with pytest.raises(RadError, match=r"was made with other settings \(model_fingerprint "):
        run_ablation(config)


def test_an_aligned_arm_aligns_then_distils_from_the_aligned_student(tiny_src, tmp_path):
    """`searched-rad-mixers-aligned`: rad align (the ablation's align settings) into arms/<arm>/align, then the KD
    starts from align/student; its twin without alignment starts from the conversion. Both in one ablation."""
    from rad.ablate import AblateAlign

    align = AblateAlign(steps=3, batch=2, seq_len=32, data=str(tiny_src / "data.jsonl"), eval_examples=6,
                        max_examples=None, eval_sequences=4, kl_eval=False, precision="fp32")
    out = tmp_path / "aligned"
    result = run_ablation(_tiny_config(tiny_src, out, layers=["searched"], inits=["rad"], train=["mixers"],
                                       extra_arms=["searched-rad-mixers-aligned"], align=align))
    arms = result.summary.arms
    assert set(arms) >= {"searched-rad-mixers", "searched-rad-mixers-aligned"}
    aligned = out / "arms" / "searched-rad-mixers-aligned"
    started = json.loads((aligned / "distill" / "config.json").read_text())["hybrid"]
    assert Path(started) == aligned / "align" / "student"
    plain = json.loads((out / "arms" / "searched-rad-mixers" / "distill" / "config.json").read_text())["hybrid"]
    assert Path(plain) == out / "arms" / "searched-rad-mixers" / "hybrid"
    # the aligned student's mixers moved (3 steps), so the KD's step-0 KL differs from the plain arm's
    assert arms["searched-rad-mixers-aligned"].kl_at_init != arms["searched-rad-mixers"].kl_at_init
    assert arms["searched-rad-mixers-aligned"].timings["align_s"] > 0
    assert json.loads((aligned / "settings.json").read_text())["align"]["steps"] == 3
    assert not (aligned / "align" / "checkpoints").exists()  # deleted with the KD's (keep_arm_checkpoints off)
    assert "| searched-rad-mixers-aligned |" in (out / "report.md").read_text()
