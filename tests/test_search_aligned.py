"""Selection after alignment: the `hybrid-agreement` objective scores the hybrid built from aligned mixers.

The reference is always the real converted Bamba hybrid (rad convert of the mask's layers, with the aligned
mixers' weights), never the code under test.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from rad.cli import main
from rad.errors import RadError
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid
from rad.models.mixers import mixer_layers
from rad.models.skip import substitute_attention
from rad.search import SearchConfig, make_objective, run_search
from rad.search.aligned import load_aligned_mixers

from .conftest import FAMILIES, make_tiny, word_tokenizer


def _source(family: str = "llama", seed: int = 0):
    # attention that matters (init std 0.1), as the search tests use
    return make_tiny(family, seed=seed, num_hidden_layers=4, initializer_range=0.1).eval()


def _all_layer_hybrid(src, seed: int = 3, init: str = "random"):
    """Every layer converted, mixers non-zero: stands in for `rad align`'s output (what alignment learnt does not
    matter to the objective, only that the mixers are these)."""
    cfg = ConversionConfig(layers=list(range(src.config.num_hidden_layers)), init=init, seed=seed)
    return convert_to_hybrid(src, cfg).eval(), cfg


def _hybrid_of(src, theirs: dict, mask):
    """The reference: the real hybrid converting `mask`, carrying the given {layer: mixer} there."""
    hybrid = convert_to_hybrid(src, ConversionConfig(layers=list(mask), init="random", seed=11)).eval()
    for i, mixer in mixer_layers(hybrid).items():
        mixer.load_state_dict(theirs[i].state_dict())
    return hybrid


def _save(model, folder: Path, source: Path, cfg: ConversionConfig) -> Path:
    save_hybrid(model, word_tokenizer(), folder, conversion_record(str(source), make_tiny("llama"), cfg),
                overwrite=True)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_substituted_mixers_compute_the_converted_hybrid(family):
    """Teacher + `substitute_attention` == the converted hybrid with the same mixers (float64, 1e-10)."""
    src = _source(family).double()
    all_layers, _ = _all_layer_hybrid(src)
    all_layers = all_layers.double()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    for mask in ([1], [0, 2], [1, 2, 3]):
        reference = _hybrid_of(src, mixer_layers(all_layers), mask).double()
        with torch.no_grad():
            want = reference(input_ids=ids).logits
            with substitute_attention(src, {i: mixer_layers(all_layers)[i] for i in mask}):
                got = src(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with torch.no_grad():  # undone on exit: the teacher again
        torch.testing.assert_close(src(input_ids=ids).logits, _source(family).double()(input_ids=ids).logits)


def _agreement_of(model, objective) -> float:
    """Top-1 agreement of `model` with the objective's reference tokens, computed from the model's own logits."""
    agree = 0
    with torch.no_grad():
        for (ids, where), ref in zip(objective.batches, objective.reference, strict=True):
            agree += int((model(input_ids=ids).logits[where].argmax(-1) == ref).sum())
    return agree / objective.positions


def test_hybrid_agreement_is_the_agreement_of_the_real_hybrid():
    src = _source()
    all_layers, _ = _all_layer_hybrid(src)
    prompts = [torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    objective = make_objective("hybrid-agreement", src, prompts, max_new_tokens=10,
                               mixers=mixer_layers(all_layers))
    values = {}
    for mask in itertools.combinations(range(4), 2):
        values[mask] = objective.evaluate(mask).value
        reference = _hybrid_of(src, mixer_layers(all_layers), mask)
        assert values[mask] == _agreement_of(reference, objective)
    assert objective.evaluate(()).value == 1.0
    assert len(set(values.values())) > 1  # the masks differ: the test could tell a wrong mask apart


def test_with_zero_mixers_it_is_the_skip_draft_agreement():
    """The `rad` init's mixers output exactly zero, so their hybrid is the skip-draft: both objectives agree."""
    src = _source()
    zero, _ = _all_layer_hybrid(src, init="rad-zero-in-proj")
    prompts = [torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    hybrid = make_objective("hybrid-agreement", src, prompts, max_new_tokens=10, mixers=mixer_layers(zero))
    skip = make_objective("agreement", src, prompts, max_new_tokens=10)
    for mask in itertools.combinations(range(4), 2):
        assert hybrid.evaluate(mask).value == skip.evaluate(mask).value


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny Llama source folder and an 'aligned' all-layer hybrid of it (random mixers)."""
    root = tmp_path_factory.mktemp("aligned")
    src = _source()
    src.save_pretrained(root / "src")
    word_tokenizer().save_pretrained(root / "src")
    hybrid, cfg = _all_layer_hybrid(src)
    _save(hybrid, root / "align" / "student", root / "src", cfg)
    return root


def test_the_search_picks_the_best_real_hybrid(aligned, tmp_path):
    """Every one of the 6 masks measured: the chosen one is the best of the real hybrids, with its value."""
    src = _source()
    all_layers = load_aligned_mixers(aligned / "align", src)
    config = SearchConfig(k=2, objective="hybrid-agreement", aligned=str(aligned / "align"), trials=6,
                          sampler="random", startup_trials=6, max_new_tokens=10, baselines=False, plots=False,
                          prompt_ids=[[5, 6, 7, 8, 9, 10], [20, 21, 22, 23], [40, 41, 42, 43, 44]],
                          out=tmp_path / "search")
    result = run_search(str(aligned / "src"), config)
    objective = make_objective("agreement", src, [torch.tensor([p]) for p in config.prompt_ids], max_new_tokens=10)
    direct = {mask: _agreement_of(_hybrid_of(src, all_layers, mask), objective)
              for mask in itertools.combinations(range(4), 2)}
    assert len(set(direct.values())) > 1
    assert result.value == max(direct.values())
    assert direct[tuple(result.layers)] == max(direct.values())
    assert result.settings["aligned_mixers"]


def _config(aligned_dir, out, **kw) -> SearchConfig:
    base = dict(k=2, objective="hybrid-agreement", aligned=str(aligned_dir), trials=2, sampler="random",
                startup_trials=2, max_new_tokens=6, baselines=False, plots=False, prompt_ids=[[5, 6, 7, 8]], out=out)
    return SearchConfig(**{**base, **kw})


def test_bad_aligned_input_is_refused_before_the_search(aligned, tmp_path):
    src = aligned / "src"
    with pytest.raises(RadError, match="give --aligned DIR"):
        _config(aligned, None, aligned=None).validate()
    with pytest.raises(RadError, match="read only by the hybrid-agreement objective"):
        _config(aligned / "align", None, objective="agreement").validate()
    with pytest.raises(RadError, match="is not a hybrid"):
        _config(src, None).validate()
    other = _source(seed=1)  # another model of the same shape: its mixers mean nothing for this one
    hybrid, cfg = _all_layer_hybrid(other)
    _save(hybrid, tmp_path / "other", src, cfg)
    with pytest.raises(RadError, match="made from another model"):
        run_search(str(src), _config(tmp_path / "other", tmp_path / "s1"))
    partial = convert_to_hybrid(_source(), ConversionConfig(layers=[0, 1], init="random", seed=3))
    _save(partial, tmp_path / "partial", src, ConversionConfig(layers=[0, 1], init="random", seed=3))
    with pytest.raises(RadError, match="candidate layers with an aligned mixer"):
        run_search(str(src), _config(tmp_path / "partial", tmp_path / "s2", k=3))
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_a_study_resumed_with_other_mixers_is_refused(aligned, tmp_path):
    src = aligned / "src"
    run_search(str(src), _config(aligned / "align", tmp_path / "s"))
    hybrid, cfg = _all_layer_hybrid(_source(), seed=4)  # same model, other mixers
    _save(hybrid, tmp_path / "again", src, cfg)
    with pytest.raises(RadError, match="aligned_mixers"):
        run_search(str(src), _config(tmp_path / "again", tmp_path / "s", resume=True))


def test_cli_needs_aligned_for_the_hybrid_objective(aligned, tmp_path, caplog):
    args = ["search", str(aligned / "src"), "--k", "2", "--objective", "hybrid-agreement", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert any("give --aligned DIR" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert main([*args, "--aligned", str(aligned / "src")]) == 2
    assert not (tmp_path / "o").exists()


def test_orchestrators_pass_the_aligned_hybrid_on(aligned):
    from rad.search.config import SearchSettings

    config = SearchSettings(k=2, objective="hybrid-agreement", aligned=str(aligned / "align")).stage_config(
        seed=0, out=None)
    assert (config.objective, config.aligned) == ("hybrid-agreement", str(aligned / "align"))
    with pytest.raises(RadError, match="give --aligned DIR"):
        SearchSettings(k=2, objective="hybrid-agreement")
