"""The benchmarks: how each item becomes a prompt and how a completion is scored.

GSM8K: zero-shot (or n-shot from the train split), chat template, step-by-step answer ending in
"The answer is N."; scored by exact numeric match of the extracted final number.
CRUXEval-O: CRUXEval's direct output-prediction prompt (two [PYTHON]/[ANSWER] examples, as in the
CRUXEval repository's `make_direct_output_prompt`), sent as one user turn; the predicted literal is
checked by `rad.evaluate.sandbox`: `f(input)` runs in an isolated child, the prediction is parsed as a literal
(or evaluated in a second child that never sees the code), and the parent compares the two values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rad.data import SOURCES, find_rows, load_rows, rows_fingerprint
from rad.errors import RadError
from rad.evaluate.extract import (
    extract_cruxeval_prediction,
    extract_final_number,
    format_number,
    gsm8k_target,
    numbers_equal,
    sanitize_python,
)
from rad.evaluate.generation import truncate_at
from rad.evaluate.passkey import PasskeyConfig, first_number
from rad.evaluate.sandbox import SandboxLimits, check_output_prediction, check_program
from rad.haystack import RAW_ANSWER, haystack, passkey_of


@dataclass
class Item:
    """One benchmark question: `messages` is the chat form, `raw` the plain-text form of the same prompt."""

    id: str
    messages: list[dict]
    raw: str
    reference: dict = field(default_factory=dict)
    # The start of the assistant's answer, put after the chat prompt's assistant turn (evalplus's HumanEval
    # prefix ends in a code fence); the model continues it, and scoring reads prefix + completion.
    response_prefix: str = ""


@dataclass(frozen=True)
class TaskOptions:
    """What changes a task's prompts or scoring; stored with the per-item file so resumes stay consistent."""

    n_shot: int = 0
    data_dir: str | None = None
    sources: tuple[str, ...] = SOURCES
    sandbox: SandboxLimits = SandboxLimits()
    passkey: PasskeyConfig = PasskeyConfig()


GSM8K_INSTRUCTION = (
    "Solve the following math problem step by step. "
    "End your response with 'The answer is N.' where N is the final number."
)


def _data_identity(names: list[str], options: TaskOptions) -> dict:
    """Where a task's rows came from and their content digest: part of its per-item results' identity, so a resume
    on other questions (another --data-dir, an edited file) is refused instead of keeping the old answers."""
    sources, digests = [], []
    for name in names:
        rows, located = find_rows(name, options.data_dir, options.sources)
        if rows is None:
            rows = load_rows(name, options.data_dir, options.sources)  # the clear error
        sources.append(located.where)
        digests.append(rows)
    return {"data_fingerprint": rows_fingerprint(*digests), "data_sources": sources}


def _clean_rationale(answer: str) -> str:
    """A GSM8K train answer as a worked solution: calculator annotations dropped, '#### N' -> 'The answer is N.'."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


class GSM8K:
    name = "gsm8k"
    prompt_version = "gsm8k-chat-v1"
    default_max_new_tokens = 384
    stop = ("\n\nQuestion:",)

    def __init__(self, options: TaskOptions):
        self.options = options

    def items(self, limit: int | None = None) -> list[Item]:
        rows = load_rows("gsm8k_test", self.options.data_dir, self.options.sources)
        shots = []
        if self.options.n_shot:
            train = load_rows("gsm8k_train", self.options.data_dir, self.options.sources)
            if self.options.n_shot > len(train):
                raise RadError(f"--n-shot {self.options.n_shot} asks for more examples than the GSM8K train split "
                               f"holds ({len(train)}); use at most {len(train)} (8 is the usual few-shot setting).")
            shots = train[: self.options.n_shot]
        rows = rows[:limit] if limit is not None else rows
        return [self._item(f"gsm8k-test-{i}", row, shots) for i, row in enumerate(rows)]

    def data_identity(self) -> dict:
        return _data_identity(["gsm8k_test", *(["gsm8k_train"] if self.options.n_shot else [])], self.options)

    def _item(self, item_id: str, row: dict, shots: list[dict]) -> Item:
        messages, raw = [], []
        for shot in shots:
            messages += [
                {"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{shot['question']}"},
                {"role": "assistant", "content": _clean_rationale(shot["answer"])},
            ]
            raw.append(f"Question: {shot['question']}\nAnswer: {_clean_rationale(shot['answer'])}")
        messages.append({"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{row['question']}"})
        raw.append(f"Question: {row['question']}\nAnswer:")
        text = (GSM8K_INSTRUCTION + "\n\n" if not shots else "") + "\n\n".join(raw)
        target = format_number(gsm8k_target(row["answer"]))
        return Item(item_id, messages, text, {"question": row["question"], "target": target})

    def score(self, item: Item, completion: str) -> dict:
        prediction = extract_final_number(completion)
        target = gsm8k_target("#### " + item.reference["target"])
        return {"prediction": format_number(prediction), "target": item.reference["target"],
                "correct": numbers_equal(prediction, target)}


CRUX_PROMPT = """You are given a Python function and an assertion containing an input to the function. \
Complete the assertion with a literal (no unsimplified expressions, no function calls) containing the output \
when executing the provided code on the given input, even if the function is incorrect or incomplete. \
Do NOT output any extra information. Provide the full assertion with the correct output in [ANSWER] and \
[/ANSWER] tags, following the examples.

[PYTHON]
def f(n):
    return n
assert f(17) == ??
[/PYTHON]
[ANSWER]
assert f(17) == 17
[/ANSWER]

[PYTHON]
def f(s):
    return s + "a"
assert f("x9j") == ??
[/PYTHON]
[ANSWER]
assert f("x9j") == "x9ja"
[/ANSWER]

[PYTHON]
{code}
assert f({input}) == ??
[/PYTHON]
"""


class CRUXEvalO:
    name = "cruxeval"
    prompt_version = "cruxeval-o-direct-v1"
    default_max_new_tokens = 128
    stop = ("[/ANSWER]",)

    def __init__(self, options: TaskOptions):
        self.options = options
        if options.n_shot:
            raise RadError("CRUXEval uses its own two-example prompt; --n-shot applies to GSM8K only.")

    def items(self, limit: int | None = None) -> list[Item]:
        rows = load_rows("cruxeval", self.options.data_dir, self.options.sources)
        rows = rows[:limit] if limit is not None else rows
        items = []
        for row in rows:
            prompt = CRUX_PROMPT.format(code=row["code"], input=row["input"])
            items.append(Item(
                str(row["id"]), [{"role": "user", "content": prompt}], prompt + "[ANSWER]\n",
                {"code": row["code"], "input": row["input"], "target": row["output"]},
            ))
        return items

    def data_identity(self) -> dict:
        return _data_identity(["cruxeval"], self.options)

    def score(self, item: Item, completion: str) -> dict:
        prediction = extract_cruxeval_prediction(completion, item.reference["input"])
        if not prediction:
            return {"prediction": "", "target": item.reference["target"], "correct": False, "status": "empty",
                    "isolation": self.options.sandbox.isolation}
        verdict = check_output_prediction(
            item.reference["code"], item.reference["input"], prediction, self.options.sandbox
        )
        return {"prediction": prediction, "target": item.reference["target"], "correct": verdict.passed,
                "status": verdict.status, "detail": verdict.detail, "isolation": verdict.isolation}


# evalplus's prompt for chat models (evalplus/provider/utility.py, `make_raw_chat_prompt`): the instruction as the
# user turn, and the assistant's answer started with its response prefix and an opened ```python fence, which the
# model continues. (Without the prefix, Qwen2.5-Coder-0.5B-Instruct opened 144 of 164 answers with "```" and a
# line "python": 9.8% pass@1 instead of the ~60% its report gives.)
HUMANEVAL_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
                         "markdown code block:\n```\n{prompt}\n```\n")
HUMANEVAL_RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and "
                             "passes corresponding tests:\n```python\n")
# The Codex paper's stop sequences for a plain completion: the function body ends where top-level code starts.
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def humaneval_program(prompt: str, entry_point: str, completion: str) -> str:
    """The code a HumanEval answer stands for: a chat answer's first fenced block (with the prompt's signature
    and imports put back when the block lacks the function), sanitised as evalplus does (`sanitize_python`: the
    example calls a chat model adds after its function are not part of the answer), or the prompt + a plain
    completion cut at the Codex stop sequences."""
    fenced = _FENCE.search(completion)
    if fenced is not None:
        code = fenced.group(1)
        if not re.search(rf"^def {re.escape(entry_point)}\(", code, re.MULTILINE):
            code = prompt + code
        return sanitize_python(code, entry_point)
    return prompt + truncate_at(completion, HUMANEVAL_STOPS)


class HumanEval:
    """Code completion, pass@1 greedy (Chen et al. 2021): the program and its tests run in the sandbox."""

    name = "humaneval"
    prompt_version = "humaneval-v2"  # raw: the prompt as a completion; chat: evalplus's instruction and prefix
    score_version = "evalplus-sanitize-v1"  # a chat answer's code sanitised (`humaneval_program`) before its tests
    default_max_new_tokens = 512
    stop = ()  # cut in `score`: a chat answer ends at its fence, a completion at top-level code

    def __init__(self, options: TaskOptions):
        self.options = options
        if options.n_shot:
            raise RadError("HumanEval is zero-shot; --n-shot applies to GSM8K only.")

    def items(self, limit: int | None = None) -> list[Item]:
        rows = load_rows("humaneval", self.options.data_dir, self.options.sources)
        rows = rows[:limit] if limit is not None else rows
        return [Item(row["task_id"], [{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"].strip())}],
                     row["prompt"], {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]},
                     response_prefix=HUMANEVAL_RESPONSE_PREFIX)
                for row in rows]

    def data_identity(self) -> dict:
        return _data_identity(["humaneval"], self.options)

    def score(self, item: Item, completion: str) -> dict:
        ref = item.reference
        program = humaneval_program(ref["prompt"], ref["entry_point"], completion)
        verdict = check_program(f"{program}\n\n{ref['test']}\n\ncheck({ref['entry_point']})\n", self.options.sandbox)
        return {"prediction": program, "target": "", "correct": verdict.passed, "status": verdict.status,
                "detail": verdict.detail, "isolation": verdict.isolation}


class Passkey:
    """Long-context recall (evaluate/passkey.py): the key hidden at each depth of each context length."""

    name = "passkey"
    prompt_version = "passkey-v1"
    default_max_new_tokens = 8
    stop = ("\n",)
    needs_tokenizer = True  # the haystack is fitted to a length in the model's own tokens

    def __init__(self, options: TaskOptions):
        self.options = options
        self.tokenizer = None
        if options.n_shot:
            raise RadError("The passkey task is zero-shot; --n-shot applies to GSM8K only.")

    def bind(self, tokenizer) -> Passkey:
        self.tokenizer = tokenizer
        return self

    def max_length(self) -> int:
        return max(self.options.passkey.lengths)

    def items(self, limit: int | None = None) -> list[Item]:
        if self.tokenizer is None:
            raise RadError("The passkey task needs the model's tokenizer to build its items (Passkey.bind).")
        count = _token_counter(self.tokenizer)
        items = []
        for length, depth, repeat in self.options.passkey.cells()[:limit]:
            key = passkey_of(length, depth, repeat)
            text, tokens = haystack(length, depth, key, count)
            items.append(Item(f"passkey-{length}-{depth}-{repeat}", [{"role": "user", "content": text}],
                              text + RAW_ANSWER, {"target": key, "length": length, "depth": depth,
                                                  "tokens": tokens}))
        return items

    def data_identity(self) -> dict:
        return {"data_fingerprint": self.options.passkey.fingerprint(), "data_sources": ["synthetic"]}

    def score(self, item: Item, completion: str) -> dict:
        prediction = first_number(completion)
        return {"prediction": prediction, "target": item.reference["target"],
                "correct": prediction == item.reference["target"], "length": item.reference["length"],
                "depth": item.reference["depth"]}


def _token_counter(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count


TASKS = {"gsm8k": GSM8K, "cruxeval": CRUXEvalO, "humaneval": HumanEval, "passkey": Passkey}


def make_task(name: str, options: TaskOptions):
    if name not in TASKS:
        raise RadError(f"Unknown task {name!r}; choose from {', '.join(TASKS)}.")
    return TASKS[name](options)
