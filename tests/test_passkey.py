"""Long-context recall (the passkey task): haystacks fitted to a length in tokens, the key where the depth says,
exact-match scoring, refusals before any model is loaded."""

from __future__ import annotations

import json

import pytest

from rad.cli import main
from rad.errors import RadError
from rad.evaluate import EvalConfig, evaluate_model
from rad.evaluate.passkey import PasskeyConfig, first_number
from rad.evaluate.tasks import TaskOptions, make_task
from rad.haystack import FILLER, NEEDLE, haystack, passkey_of
from rad.models.loading import load_model

from .conftest import make_tiny, word_tokenizer


def words(text: str) -> int:  # an independent token count: whitespace words
    return len(text.split())


@pytest.mark.parametrize("length", [256, 1000, 4096])
@pytest.mark.parametrize("depth", [0, 30, 100])
def test_the_haystack_fills_the_length_and_puts_the_key_at_its_depth(length, depth):
    key = passkey_of(length, depth, 0)
    text, tokens = haystack(length, depth, key, words)
    per_unit = words(FILLER)
    assert tokens == words(text) and length - 2 * per_unit <= tokens <= length
    before, _, after = text.partition(NEEDLE.format(key=key))
    units_before, units_after = before.count(FILLER), after.count(FILLER)
    assert units_before / (units_before + units_after) == pytest.approx(depth / 100, abs=1.5 / (units_before
                                                                                                  + units_after))
    assert text.count(key) == 2  # the needle says it twice, nothing else holds it


def test_items_are_fixed_ordered_and_distinct():
    task = make_task("passkey", TaskOptions(passkey=PasskeyConfig(lengths=(512, 256), depths=(50, 0), repeats=2)))
    items = task.bind(word_tokenizer()).items()
    assert [i.id for i in items][:4] == ["passkey-256-0-0", "passkey-256-0-1", "passkey-256-50-0", "passkey-256-50-1"]
    assert len(items) == 8 and len({i.reference["target"] for i in items}) == 8
    assert [i.reference for i in task.items(3)] == [i.reference for i in items[:3]]  # --limit keeps the first
    assert task.score(items[0], f" {items[0].reference['target']}.")["correct"]
    assert not task.score(items[0], " 12345")["correct"] or items[0].reference["target"] == "12345"
    assert first_number("The pass key is 71432. Remember") == "71432" and first_number("no") == ""


@pytest.mark.parametrize("make, words_", [
    (lambda: PasskeyConfig(depths=(101,)), "depths are percentages"),
    (lambda: PasskeyConfig(lengths=(100,)), "at least 256 tokens"),
    (lambda: PasskeyConfig(repeats=0), "repeats must be at least 1"),
    (lambda: PasskeyConfig(lengths=()), "at least 256 tokens"),
])
def test_bad_passkey_settings_are_one_sentence(make, words_):
    with pytest.raises(RadError, match=words_):
        make()


def test_a_length_beyond_the_models_positions_is_refused_before_loading(tmp_path, caplog):
    folder = tmp_path / "tiny"  # 256 positions
    make_tiny("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    code = main(["eval", str(folder), "--tasks", "passkey", "--passkey-lengths", "256,4096", "--out",
                 str(tmp_path / "out")])
    assert code == 2
    assert any("asks for 4096 tokens of context" in r.getMessage() and "has 256 positions" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")
    assert not (tmp_path / "out").exists()
    assert main(["eval", str(folder), "--tasks", "passkey", "--passkey-depths", "50,x", "--out",
                 str(tmp_path / "out")]) == 2


def test_rad_eval_scores_passkey_items_and_records_their_cell(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny("llama", max_position_embeddings=1024).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    loaded = load_model(str(folder))
    config = EvalConfig(tasks=["passkey"], out=str(tmp_path / "e"), chat=False,
                        passkey=PasskeyConfig(lengths=(256,), depths=(0, 100)))
    result = evaluate_model(loaded, config).tasks["passkey"]
    assert result.total == 2
    items = [json.loads(line) for line in (tmp_path / "e" / "tiny" / "passkey.jsonl").read_text().splitlines()]
    assert [(r["length"], r["depth"]) for r in items] == [(256, 0), (256, 100)]
    meta = json.loads((tmp_path / "e" / "tiny" / "passkey.meta.json").read_text())
    assert meta["data_sources"] == ["synthetic"]
    with pytest.raises(RadError, match="data_fingerprint"):  # other lengths: other items, refused on resume
        evaluate_model(loaded, EvalConfig(tasks=["passkey"], out=str(tmp_path / "e"), chat=False,
                                          passkey=PasskeyConfig(lengths=(512,), depths=(0, 100))))


def test_the_recall_grid_and_its_heat_map(tmp_path):
    from rad.evaluate.passkey import plot_recall, recall_grid

    records = [{"length": 1024, "depth": 0, "correct": True}, {"length": 1024, "depth": 0, "correct": False},
               {"length": 4096, "depth": 50, "correct": True}]
    grid = recall_grid(records)
    assert grid == {1024: {0: [1, 2]}, 4096: {50: [1, 1]}}
    plot_recall({"teacher": grid, "hybrid": grid}, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_rad_eval_writes_the_recall_grid_of_every_model(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny("llama", max_position_embeddings=1024).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    assert main(["eval", str(folder), "--tasks", "passkey", "--passkey-lengths", "256", "--passkey-depths", "0,100",
                 "--no-chat", "--out", str(tmp_path / "out")]) == 0
    grid = json.loads((tmp_path / "out" / "passkey_recall.json").read_text())
    assert list(grid) == [str(folder)] and grid[str(folder)]["256"].keys() == {"0", "100"}
    assert (tmp_path / "out" / "passkey_recall.png").is_file()
