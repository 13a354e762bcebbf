"""The decode engine: fast path vs the model's own forward, lossless greedy SSD, exact speculative sampling."""

import itertools
import random

import pytest
import torch
from scipy.stats import chisquare

from rad.decoding.runner import FastDecoder
from rad.decoding.speculative import (
    DraftConfig,
    SamplingConfig,
    draft_generate,
    greedy_generate,
    speculative_generate,
)
from rad.errors import RadError
from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.layers import uniform_layers
from rad.ops.ssd import ssd_reference, ssd_scan_with_states

from .conftest import FAMILIES, make_tiny


@pytest.mark.parametrize("t", [1, 2, 9])
def test_ssd_scan_matches_float64_recurrence(t):
    g = torch.Generator().manual_seed(t)
    b, h, p, n = 2, 3, 4, 5
    state = torch.randn(b, h, p, n, generator=g)
    x, B, C = (torch.randn(b, t, h, k, generator=g) for k in (p, n, n))
    dt = torch.rand(b, t, h, generator=g) * 0.5
    A, D = -torch.rand(h, generator=g) * 8, torch.randn(h, generator=g)
    y, states = ssd_scan_with_states(state, x, dt, A, B, C, D)
    y_ref, states_ref = ssd_reference(state, x, dt, A, B, C, D)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states.double(), states_ref, rtol=1e-5, atol=1e-5)


def _models(family):
    model = make_tiny(family)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[1, 2], init="mil", chunk_size=8))
    # a lean geometry: B and C shared by 3 heads each, a smaller state (random init: every tensor non-zero)
    lean = convert_to_hybrid(model, ConversionConfig(layers=[0, 3], init="random", chunk_size=8, n_groups="kv",
                                                     d_state=4))
    return {"source": model, "hybrid": hybrid, "hybrid-kv-groups": lean}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fast_decoder_matches_model_forward(family):
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(5))
    for name, model in _models(family).items():
        with torch.no_grad():
            reference = model(ids).logits
        decoder = FastDecoder(model)
        cache = decoder.new_cache(64)
        last = decoder.prefill(ids[:, :17], cache)
        torch.testing.assert_close(last, reference[:, 16], rtol=0, atol=1e-4, msg=name)
        logits, pending = decoder.forward(ids[:, 17:23], cache)  # a verification-sized chunk
        decoder.commit(cache, pending, 6)
        torch.testing.assert_close(logits, reference[:, 17:23], rtol=0, atol=1e-4, msg=name)
        for t in range(23, 30):
            logits, pending = decoder.forward(ids[:, t : t + 1], cache)
            decoder.commit(cache, pending, 1)
            torch.testing.assert_close(logits[:, 0], reference[:, t], rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_commit_rolls_back_exactly(family):
    """Commit 2 of 5 tokens, then continue: equals feeding only those 2 (KV crop + SSM state pick)."""
    hybrid = _models(family)["hybrid"]
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(6))
    decoder = FastDecoder(hybrid)
    a, b = decoder.new_cache(40), decoder.new_cache(40)
    decoder.prefill(ids[:, :10], a)
    decoder.prefill(ids[:, :10], b)
    _, pending = decoder.forward(torch.cat([ids[:, 10:12], torch.tensor([[7, 8, 9]])], 1), a)
    decoder.commit(a, pending, 2)
    _, pending = decoder.forward(ids[:, 10:12], b)
    decoder.commit(b, pending, 2)
    la, _ = decoder.forward(ids[:, 12:16], a)
    lb, _ = decoder.forward(ids[:, 12:16], b)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)


def _hf_greedy(model, ids, n, eos):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=eos)
    return out[0, ids.shape[1]:]


def _check_lossless(model, prompts, masks, configs, new_tokens, eos):
    decoder = FastDecoder(model)
    for ids in prompts:
        reference = _hf_greedy(model, ids, new_tokens, eos)
        for skip, draft in itertools.product(masks, configs):
            result = speculative_generate(model, ids, skip, new_tokens, draft=draft, eos_token_id=eos, decoder=decoder)
            assert torch.equal(result.tokens, reference), (skip, draft)
            assert result.accepted <= result.drafted


ALL_DRAFTS = [DraftConfig(max_draft=d, adaptive=a) for d in range(1, 9) for a in (False, True)]


@pytest.mark.parametrize("kind", ["source", "hybrid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ssd_is_lossless_tiny_every_draft_length(family, kind):
    """Llama meets every (prompt, mask, draft config); the other families every draft config once, spread over
    the (prompt, mask) pairs (an eighth of the calls: the engine is the same, the layers' forward differs)."""
    model = _models(family)[kind]
    attn = [i for i in range(4) if not hasattr(model.model.layers[i], "mamba")]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (1, n), generator=gen) for n in (3, 11)]
    masks = [[], attn, [attn[0]], attn[-1:]]
    if family == "llama":
        _check_lossless(model, prompts, masks, ALL_DRAFTS, new_tokens=24, eos=None)
        return
    for j, skip in enumerate(masks):  # 4 masks x 2 prompts x 2 configs = the 16 configs once each
        for i, ids in enumerate(prompts):
            drafts = ALL_DRAFTS[4 * j + 2 * i : 4 * j + 2 * i + 2]
            _check_lossless(model, [ids], [skip], drafts, new_tokens=24, eos=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ssd_stops_at_eos_like_generate(family):
    model = make_tiny(family)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(8))
    free = _hf_greedy(model, ids, 30, None)
    eos = int(free[5])  # a token that the model emits mid-way
    reference = _hf_greedy(model, ids, 30, eos)
    assert reference.numel() < 30 and int(reference[-1]) == eos
    for draft in (DraftConfig(max_draft=3, adaptive=False), DraftConfig()):
        result = speculative_generate(model, ids, [1], 30, draft=draft, eos_token_id=eos)
        assert torch.equal(result.tokens, reference)


def _chat(tokenizer, text):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids


PROMPTS = ["Write a haiku about autumn leaves.", "List three uses of a paperclip.",
           "Explain what a hash table is.", "Translate 'good morning' into French and Spanish."]


def test_greedy_ssd_is_lossless_on_the_default_model(default_model):
    model, tok = default_model.model, default_model.tokenizer
    rng = random.Random(0)
    masks = [[], list(range(30)), sorted(rng.sample(range(30), 8)), uniform_layers(15, 30)]
    configs = [DraftConfig(max_draft=d, adaptive=a) for d, a in [(1, False), (3, False), (8, False), (8, True),
                                                                 (5, True), (2, True)]]
    prompts = [_chat(tok, p) for p in PROMPTS[:3]]  # 3 prompts x 4 masks: every draft config twice
    decoder = FastDecoder(model)
    for i, ids in enumerate(prompts):
        reference = _hf_greedy(model, ids, 24, tok.eos_token_id)
        for j, skip in enumerate(masks):
            draft = configs[(i + j) % len(configs)]
            result = speculative_generate(model, ids, skip, 24, draft=draft, eos_token_id=tok.eos_token_id,
                                          decoder=decoder)
            assert torch.equal(result.tokens, reference), (i, skip, draft)
            if not skip:
                assert result.accepted == result.drafted  # the draft is the verifier


def test_greedy_ssd_is_lossless_on_a_default_model_hybrid(default_model):
    model, tok = default_model.model, default_model.tokenizer
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=uniform_layers(8, 30), init="mil"))
    attn = [i for i in range(30) if hasattr(hybrid.model.layers[i], "self_attn")]
    rng = random.Random(1)
    masks = [[], attn, sorted(rng.sample(attn, 6))]
    configs = [DraftConfig(max_draft=4, adaptive=False), DraftConfig(max_draft=8, adaptive=True)]
    # each prompt meets every mask once, with the two draft configs alternating (the tiny-model tests cover
    # every mask x draft-length pair)
    decoder = FastDecoder(hybrid)
    for i, ids in enumerate([_chat(tok, p) for p in PROMPTS[:2]]):
        reference = _hf_greedy(hybrid, ids, 24, tok.eos_token_id)
        for j, skip in enumerate(masks):
            result = speculative_generate(hybrid, ids, skip, 24, draft=configs[(i + j) % 2],
                                          eos_token_id=tok.eos_token_id, decoder=decoder)
            assert torch.equal(result.tokens, reference), (skip, configs[(i + j) % 2])


def test_plain_greedy_matches_generate_and_counts_no_rounds():
    model = _models("qwen2")["hybrid"]
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(9))
    result = greedy_generate(model, ids, 20)
    assert torch.equal(result.tokens, _hf_greedy(model, ids, 20, None))
    assert result.rounds == 0 and result.tokens_per_second > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_alone_matches_generate_with_the_attention_skipped(family):
    """The draft by itself (the prompt included) is the model under `skip_attention`, decoded by HF generate."""
    from rad.models.skip import skip_attention

    model = _models(family)["source"]
    gen = torch.Generator().manual_seed(3)
    changed = 0
    for skip, n in itertools.product(([1], [0, 3], [0, 1, 2, 3]), (2, 7, 12)):
        ids = torch.randint(3, 96, (1, n), generator=gen)
        result = draft_generate(model, ids, skip, 16)
        with skip_attention(model, skip):
            reference = _hf_greedy(model, ids, 16, None)
        assert torch.equal(result.tokens, reference), (skip, n)
        assert result.rounds == 0 and result.tokens_per_second > 0
        changed += not torch.equal(result.tokens, _hf_greedy(model, ids, 16, None))
    assert changed  # the skip changes the text somewhere: the check above is not the full model twice


def _second_token_marginal(model, ids, temperature, second_skip=()):
    """P(token 2) = sum_t1 p(t1) p'(token 2 | t1): exact, by enumerating t1 (p' = the draft if second_skip)."""
    from rad.models.skip import skip_attention

    with torch.no_grad():
        p1 = torch.softmax(model(ids).logits[0, -1].double() / temperature, -1)
        vocab = p1.numel()
        batch = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        with skip_attention(model, second_skip):
            p2 = torch.softmax(model(batch).logits[:, -1].double() / temperature, -1)
    return p1 @ p2


@pytest.mark.slow  # ~26 s on one busy core
def test_speculative_sampling_matches_the_verifier_distribution():
    model = make_tiny("llama", vocab_size=12, seed=3)
    with torch.no_grad():  # make the draft (layers 0-2 skipped) clearly different from the verifier
        for i in range(3):
            model.model.layers[i].self_attn.o_proj.weight.mul_(10.0)
    ids = torch.tensor([[3, 5, 7, 1]])
    temperature = 0.4
    verifier = _second_token_marginal(model, ids, temperature)
    always_accept = _second_token_marginal(model, ids, temperature, second_skip=[0, 1, 2])
    decoder = FastDecoder(model)
    n = 3000
    counts = torch.zeros(12, dtype=torch.float64)
    accepted = drafted = 0
    for seed in range(n):
        result = speculative_generate(model, ids, [0, 1, 2], 3, draft=DraftConfig(max_draft=1, adaptive=False),
                                      sampling=SamplingConfig(temperature=temperature, seed=seed), decoder=decoder)
        counts[int(result.tokens[1])] += 1
        accepted, drafted = accepted + result.accepted, drafted + result.drafted
    assert drafted == n and 0 < accepted < n  # the acceptance rule was exercised both ways
    keep = verifier * n >= 5
    expected = verifier[keep] * n
    observed = counts[keep]
    expected = expected * observed.sum() / expected.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # Power: a wrong rule that accepts every draft token would give `always_accept`; the same test rejects it.
    shifted = (always_accept[keep] * n) * observed.sum() / (always_accept[keep] * n).sum()
    assert float((((shifted - expected) ** 2) / expected).sum()) > 60  # chi-square 1e-3 critical value ~ 30


def test_engine_rejects_bad_input():
    hybrid = _models("llama")["hybrid"]
    with pytest.raises(RadError, match="one prompt"):
        speculative_generate(hybrid, torch.ones(2, 4, dtype=torch.long), [0], 4)
    with pytest.raises(RadError, match="Mamba2 mixer"):
        speculative_generate(hybrid, torch.ones(1, 4, dtype=torch.long), [1], 4)
    with pytest.raises(RadError, match="layers 0..3"):
        speculative_generate(hybrid, torch.ones(1, 4, dtype=torch.long), [9], 4)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen25_head_layout_converts_decodes_and_drafts_exactly(tied):
    """Qwen2.5-0.5B's attention layout at tiny size: 14 query heads over 2 KV heads (groups of 7), q/k/v
    biases, the head untied or tied (0.5B ties it). The RAD hybrid equals the draft, the fast decoder equals
    the model's forward, and greedy self-speculation reproduces `generate`."""
    from rad.models.skip import skip_attention

    model = make_tiny("qwen2", hidden_size=56, num_attention_heads=14, num_key_value_heads=2,
                      tie_word_embeddings=tied)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.randint(3, 96, (1, 21), generator=torch.Generator().manual_seed(11))
    rad = convert_to_hybrid(model, ConversionConfig(layers=[0, 2], init="rad", chunk_size=8))
    with torch.no_grad(), skip_attention(model, [0, 2]):
        draft = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(rad(ids).logits, draft, rtol=0, atol=1e-5)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[1, 2], init="mil", chunk_size=8))
    for name, m in (("source", model), ("hybrid", hybrid)):
        with torch.no_grad():
            reference = m(ids).logits
        decoder = FastDecoder(m)
        cache = decoder.new_cache(40)
        torch.testing.assert_close(decoder.prefill(ids[:, :13], cache), reference[:, 12], rtol=0, atol=1e-4, msg=name)
        logits, pending = decoder.forward(ids[:, 13:21], cache)
        torch.testing.assert_close(logits, reference[:, 13:21], rtol=0, atol=1e-4, msg=name)
        attn = [i for i in range(4) if not hasattr(m.model.layers[i], "mamba")]
        _check_lossless(m, [ids[:, :7]], [attn[:1], attn], [DraftConfig(max_draft=3, adaptive=False), DraftConfig()],
                        new_tokens=16, eos=None)
