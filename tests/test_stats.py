"""Paired statistics for task accuracies: the exact McNemar test and the pairing of rad eval's per-item files."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from scipy.stats import binomtest

from rad.errors import RadError
from rad.evaluate import EvalConfig, evaluate_model, mcnemar_exact, mcnemar_items, pair_outcomes, paired_test
from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.loading import LoadedModel
from tests.conftest import make_tiny, word_tokenizer


@pytest.mark.parametrize("b, c, p", [
    (1, 6, 0.125),  # 2 * (1 + 6) / 2^7 = 14/128
    (6, 1, 0.125),  # symmetric
    (0, 5, 0.0625),  # 2 / 2^5
    (0, 1, 1.0),  # 2 * 1/2, capped
    (4, 4, 1.0),
    (0, 0, 1.0),  # no discordant pair: no evidence either way
    (2, 10, 2 * (1 + 12 + 66) / 4096),  # 158/4096 = 0.03857...
])
def test_mcnemar_hand_computed(b, c, p):
    result = mcnemar_exact(b, c)
    assert result.p_value == p
    assert (result.b, result.c, result.n_discordant) == (b, c, b + c)
    assert result.better == ("a" if b > c else "b" if c > b else "tie")


def _brute_force(b: int, c: int) -> float:
    """Two-sided exact test by enumeration: the probability, under fair coin flips, of a split at least as
    lopsided as |b - c| (an independent route to the same number)."""
    n = b + c
    if n == 0:
        return 1.0
    extreme = abs(b - c)
    hits = sum(1 for flips in itertools.product((0, 1), repeat=n) if abs(2 * sum(flips) - n) >= extreme)
    return hits / 2**n


def test_mcnemar_matches_scipy_and_enumeration():
    for b, c in itertools.product(range(0, 9), repeat=2):
        p = mcnemar_exact(b, c).p_value
        reference = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        assert math.isclose(p, reference, rel_tol=1e-12, abs_tol=1e-15), (b, c)
        if b + c <= 14:
            assert math.isclose(p, _brute_force(b, c), rel_tol=1e-12), (b, c)
    # large counts stay finite and exact (2^n overflows a float past n = 1023)
    assert math.isclose(mcnemar_exact(600, 700).p_value, binomtest(600, 1300, 0.5).pvalue, rel_tol=1e-9)
    assert mcnemar_exact(0, 1030).p_value == 2.0**-1029  # 2 / 2^1030: no overflow, no rounding


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_mcnemar_refuses_non_counts(bad):
    with pytest.raises(RadError, match="count of items"):
        mcnemar_exact(bad, 2)


def _records(correct: str) -> list[dict]:
    return [{"id": f"t-{i}", "index": i, "correct": flag == "1"} for i, flag in enumerate(correct)]


def test_pairing_by_id_counts_discordant_items():
    a = _records("1101100")
    b = list(reversed(_records("0111001")))  # order does not matter: paired by id
    pairs = pair_outcomes(a, b)
    assert [p[0] for p in pairs] == [f"t-{i}" for i in range(7)]
    result = mcnemar_items(a, b)  # only A: t-0, t-4; only B: t-2, t-6
    assert (result.b, result.c, result.n_items, result.better) == (2, 2, 7, "tie")
    as_mapping = {r["id"]: r for r in a}  # what read_items returns
    assert mcnemar_items(as_mapping, b) == result


def test_pairing_refuses_different_items_and_duplicates():
    with pytest.raises(RadError, match=r"different items \(1 only in A \(e.g. t-6\)\)"):
        pair_outcomes(_records("1101100"), _records("110110"))
    with pytest.raises(RadError, match="twice"):
        pair_outcomes(_records("10") + _records("1"), _records("10"))
    with pytest.raises(RadError, match="'id' and a 'correct'"):
        pair_outcomes([{"id": "x"}], [{"id": "x", "correct": True}])


def test_paired_test_reads_what_rad_eval_writes(tmp_path):
    """Two models scored by evaluate_model (GSM8K, 4 items): the items files pair; a shorter limit or other
    generation settings are refused; a flipped verdict in the file is counted."""
    tok = word_tokenizer()
    source = make_tiny("llama")
    hybrid = convert_to_hybrid(source, ConversionConfig(layers=[1, 2], init="mil"))
    common = dict(tasks=["gsm8k"], max_new_tokens=3, chat=False, limit=4)
    for name, model in (("teacher", source), ("student", hybrid)):
        evaluate_model(LoadedModel(model, tok, source=name, path=None), EvalConfig(out=str(tmp_path), **common))
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    result = paired_test(teacher, student, "gsm8k")
    assert (result.n_items, result.p_value) == (4, 1.0)

    items = teacher / "gsm8k.jsonl"
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    for row in rows[:3]:
        row["correct"] = not row["correct"]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flipped = paired_test(teacher, student, "gsm8k")
    before = [json.loads(line)["correct"] for line in (student / "gsm8k.jsonl").read_text().splitlines()]
    assert (flipped.b, flipped.c) == (sum(not x for x in before[:3]), sum(before[:3]))
    assert paired_test(teacher, student, "gsm8k", limit=2).n_items == 2

    other = tmp_path / "other"
    evaluate_model(LoadedModel(hybrid, tok, source="short", path=None),
                   EvalConfig(out=str(other), **{**common, "limit": 3}))
    with pytest.raises(RadError, match="different items"):
        paired_test(teacher, other / "short", "gsm8k")
    evaluate_model(LoadedModel(hybrid, tok, source="longer", path=None),
                   EvalConfig(out=str(other), **{**common, "max_new_tokens": 5}))
    with pytest.raises(RadError, match="max_new_tokens 3 -> 5"):
        paired_test(teacher, other / "longer", "gsm8k")
    with pytest.raises(RadError, match="no cruxeval results"):
        paired_test(teacher, student, "cruxeval")
