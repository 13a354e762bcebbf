"""Turn free-form model answers into comparable values: GSM8K's final number, CRUXEval's predicted literal,
HumanEval's program.

Small models rarely follow the answer format exactly, so extraction tries the explicit markers first
(`#### N`, `\\boxed{N}`, "the answer is N") and falls back to the last number in the text.
"""

from __future__ import annotations

import ast
import re
from decimal import Decimal, InvalidOperation

# A number as people write it: optional sign and currency, thousands separators, decimals, a percent.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212])?\$?(?P<sign2>[-\u2212])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_HASHES = re.compile(r"####\s*(?P<rest>[^\n]*)")
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is)?\s*[:=]?|answer\s*[:=])\s*[:=]?\s*(?P<rest>[^\n]{0,60})",
    re.IGNORECASE,
)
_FRAC = re.compile(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` (braces may nest, e.g. `\\boxed{\\frac{1}{2}}`)."""
    found = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[match.end() : i - 1])
    return found


def parse_number(text: str) -> Decimal | None:
    """The first number in `text` as a Decimal ("$1,000.50" -> 1000.50, "-3" -> -3), or None."""
    frac, match = _FRAC.search(text), _NUMBER.search(text)
    if frac and (match is None or frac.start() <= match.start()):
        numerator, denominator = Decimal(frac.group(1)), Decimal(frac.group(2))
        return numerator / denominator if denominator else None
    return _to_decimal(match) if match else None


def _to_decimal(match: re.Match) -> Decimal | None:
    try:
        value = Decimal(match.group("num").replace(",", ""))
    except InvalidOperation:
        return None
    return -value if (match.group("sign") or match.group("sign2")) else value


def extract_final_number(text: str) -> Decimal | None:
    """The final answer of a step-by-step solution, or None when the text holds no number at all."""
    # Markdown bold around the answer; LaTeX thousands groups and thin spaces ("5{,}000", "5\\,000").
    text = text.replace("**", "").replace("{,}", ",").replace("\\!", "")
    text = re.sub(r"(?<=\d)\\,(?=\d{3})", ",", text)
    for hit in reversed(list(_HASHES.finditer(text))):
        value = parse_number(hit.group("rest"))
        if value is not None:
            return value
    for content in reversed(_boxed_contents(text)):
        value = parse_number(content)
        if value is not None:
            return value
    for hit in reversed(list(_ANSWER_IS.finditer(text))):
        value = parse_number(hit.group("rest"))
        if value is not None:
            return value
    numbers = list(_NUMBER.finditer(text))
    for match in reversed(numbers):
        value = _to_decimal(match)
        if value is not None:
            return value
    return None


def gsm8k_target(answer: str) -> Decimal:
    """The reference number of a GSM8K `answer` field (rationale, then `#### N`)."""
    value = parse_number(answer.rsplit("####", 1)[-1])
    if value is None:
        raise ValueError(f"GSM8K answer has no final number: {answer[-80:]!r}")
    return value


def numbers_equal(a: Decimal | None, b: Decimal | None) -> bool:
    """Exact numeric equality (18 == 18.0, 1,000 == 1000); None never matches."""
    return a is not None and b is not None and a == b


def format_number(value: Decimal | None) -> str | None:
    """A canonical string for the per-item file: 18.0 -> '18', 0.50 -> '0.5'."""
    if value is None:
        return None
    normal = value.normalize()
    return format(normal, "f") if normal == normal.to_integral() else str(normal)


def extract_cruxeval_prediction(text: str, inputs: str) -> str:
    """The predicted output expression from an answer in CRUXEval's `[ANSWER] assert f(x) == y [/ANSWER]` style.

    Accepts the full assertion, a bare literal, and answers wrapped in code fences; what is returned is
    Python source, executed later in the sandbox (never here).
    """
    text = text.strip()
    if "[ANSWER]" in text:
        text = text.split("[ANSWER]", 1)[1]
    text = text.split("[/ANSWER]", 1)[0]
    text = re.sub(r"^```(?:python)?\s*|\s*```.*$", "", text.strip(), flags=re.DOTALL).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    assertions = [line.strip() for line in lines if line.strip().startswith("assert") and "??" not in line]
    # A model that echoes the prompt's examples writes other assertions too: prefer the one about this input.
    call = "assertf(" + re.sub(r"\s+", "", inputs) + ")"
    ours = [a for a in assertions if re.sub(r"\s+", "", a).startswith(call)]
    line = (ours or assertions or [lines[0].strip() if lines else ""])[0]
    if not line.startswith("assert"):
        return line
    body = line[len("assert") :].strip()
    try:
        tree = ast.parse(body, mode="eval").body
        if isinstance(tree, ast.Compare) and len(tree.ops) == 1 and isinstance(tree.ops[0], ast.Eq):
            segment = ast.get_source_segment(body, tree.comparators[0])
            if segment is not None:
                return segment.strip()
    except SyntaxError:
        pass
    prefix = f"f({inputs})"
    if body.startswith(prefix):
        rest = body[len(prefix) :].strip()
        return rest[2:].strip() if rest.startswith("==") else rest
    return body.split("==", 1)[1].strip() if "==" in body else body


# What evalplus does to a model's code before HumanEval's tests run (evalplus/sanitize.py, which the Qwen2.5-Coder
# report's numbers use): keep the longest prefix that parses, then only imports and the definitions the entry point
# reaches. Chat models follow their function with example calls (`print(f(3))  # Output: ...`); run as written, a
# call with a wrong expectation in its comment, or one cut off by the token limit, fails an answer whose function
# passes the tests.
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_ASSIGNMENTS = (ast.Assign, ast.AnnAssign)


def _longest_parsing_prefix(code: str) -> tuple[str, ast.Module] | None:
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        prefix = "\n".join(lines[:end])
        try:
            return prefix, ast.parse(prefix)
        except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
            continue
    return None


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, _DEFINITIONS):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)]


def _used_names(node: ast.stmt) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def sanitize_python(code: str, entry_point: str) -> str:
    """`code` cut where it stops parsing, with only its imports and the top-level definitions `entry_point` depends
    on (each with its own text and the lines between); `code` unchanged when no prefix of it parses or none defines
    `entry_point`."""
    parsed = _longest_parsing_prefix(code)
    if parsed is None:
        return code
    source, module = parsed
    lines = source.splitlines()
    definitions: dict[str, ast.stmt] = {}
    for node in module.body:
        if isinstance(node, _DEFINITIONS + _ASSIGNMENTS):
            for name in _defined_names(node):
                definitions[name] = node  # the last binding wins, as when the module runs
    if entry_point not in definitions:
        return code
    reached, frontier = set(), [entry_point]
    while frontier:
        name = frontier.pop()
        if name in reached or name not in definitions:
            continue
        reached.add(name)
        frontier.extend(_used_names(definitions[name]) - reached)
    kept_nodes = {id(definitions[name]) for name in reached}
    dropped: set[int] = set()  # 0-based line numbers of the top-level statements left out
    for node in module.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in kept_nodes:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            dropped.update(range(first - 1, node.end_lineno))
    return "\n".join(line for i, line in enumerate(lines) if i not in dropped).rstrip() + "\n"
