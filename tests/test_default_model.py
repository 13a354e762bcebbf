"""Every claim of the foundation, on the real default model (SmolLM2-135M-Instruct from its GGUF package)."""

import numpy as np
import pytest
import torch

from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.layers import uniform_layers
from rad.models.loading import ALIASES, load_model
from rad.models.skip import skip_attention

from .test_convert import _assert_cached_equals_recomputed, _assert_stepwise_equals_full


def test_default_model_is_what_the_alias_promises(default_model):
    cfg = default_model.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3
    )
    assert cfg.tie_word_embeddings and not hasattr(cfg, "quantization_config")
    assert default_model.tokenizer.chat_template


def test_cache_holds_the_dequantised_gguf_tensors(default_model):
    """Independent reference: dequantise tensors straight from the GGUF file with the gguf package."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(ALIASES["smollm2-135m"].locate_gguf(None)))
    tensors = {t.name: t for t in reader.tensors}
    params = dict(default_model.model.named_parameters())
    # Not q/k (GGUF permutes them for llama.cpp's rotary layout); these are stored as they are.
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
        ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        t = tensors[gguf_name]
        ref = dequantize(t.data, t.tensor_type).reshape(params[hf_name].shape)
        np.testing.assert_array_equal(params[hf_name].detach().numpy(), ref.astype(np.float32))


def test_second_load_reads_the_cache(default_model, isolated_cache):
    again = load_model("smollm2-135m", device="cpu")
    assert again.path == default_model.path and str(isolated_cache) in str(again.path)
    for (n, a), (_, b) in zip(default_model.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_zero_layers_converted_equals_source(default_model, prompt_ids):
    hybrid = convert_to_hybrid(default_model.model, ConversionConfig(layers=[]))
    with torch.no_grad():
        diff = (hybrid(prompt_ids).logits - default_model.model(prompt_ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("k", [8, 15])
def test_rad_init_equals_source_with_those_layers_skipped(default_model, prompt_ids, k):
    layers = uniform_layers(k, 30)
    hybrid = convert_to_hybrid(default_model.model, ConversionConfig(layers=layers, init="rad"))
    with torch.no_grad():
        with skip_attention(default_model.model, layers):
            draft = default_model.model(prompt_ids).logits
        full = default_model.model(prompt_ids).logits
        diff = (hybrid(prompt_ids).logits - draft).abs().max().item()
    assert diff <= 1e-5
    assert (draft - full).abs().max() > 0.1  # the comparison is not vacuous


def test_hybrid_cached_generation_and_state_carry(default_model, prompt_ids):
    # mil init: the mixers compute something, so a badly carried SSM/conv state would show.
    hybrid = convert_to_hybrid(default_model.model, ConversionConfig(layers=uniform_layers(8, 30), init="mil"))
    _assert_cached_equals_recomputed(hybrid, prompt_ids, new_tokens=64)
    _assert_stepwise_equals_full(hybrid, prompt_ids[:, :96], atol=1e-3)
