"""A saved hybrid's config.json tells every loader the model's true values (docs/loaders.md).

transformers 5 is checked by loading the folder; transformers 4.57 and vLLM by reading config.json the way
their Bamba code does (the source lines are cited in docs/loaders.md). tools/check_loaders.py runs the
real transformers 4.57 in a virtual environment, too slow to build here (78-156 s).
"""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from rad.models.convert import (
    LOADER_KEYS,
    ConversionConfig,
    conversion_record,
    convert_model,
    convert_to_hybrid,
    loader_warnings,
    save_hybrid,
)
from rad.models.info import format_info, model_info

from .conftest import make_tiny, word_tokenizer

IDS = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))
LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SOURCES = {  # family, source config overrides
    "llama-theta-1e5": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
    "llama3-scaling": ("llama", {"rope_parameters": dict(LLAMA3)}),
    "qwen2-biases": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
}
# What transformers 4.57's BambaConfig.__init__ assigns whatever config.json says; a top-level key of the same
# name overrides it, because PretrainedConfig.__init__ sets every unnamed kwarg afterwards.
TRANSFORMERS_4_HARD_CODED = {"rope_theta": 10000.0, "rope_scaling": None, "partial_rotary_factor": 0.5,
                             "attention_bias": False, "mlp_bias": False}


def _saved(name, tmp_path, **conversion):
    family, overrides = SOURCES[name]
    source = make_tiny(family, **overrides)
    config = ConversionConfig(layers=[1, 3], **conversion)
    hybrid = convert_to_hybrid(source, config)
    out = save_hybrid(hybrid, word_tokenizer(), tmp_path / name, conversion_record(family, source, config))
    return source, hybrid, out, json.loads((out / "config.json").read_text())


def _true_rope(source) -> dict:
    return dict(source.config.rope_parameters)


@pytest.mark.parametrize("name", list(SOURCES))
def test_config_json_overrides_what_transformers_4_hard_codes(name, tmp_path):
    source, hybrid, _, written = _saved(name, tmp_path)
    read = {key: written.get(key, default) for key, default in TRANSFORMERS_4_HARD_CODED.items()}
    rope = _true_rope(source)
    assert read["rope_theta"] == rope["rope_theta"]
    assert read["partial_rotary_factor"] == 1.0  # the source rotates whole heads
    if rope["rope_type"] == "default":
        assert read["rope_scaling"] is None  # 4.x's unscaled path
    else:
        assert {k: read["rope_scaling"][k] for k in rope} == rope
    assert read["attention_bias"] == (source.config.model_type == "qwen2")
    assert read["mlp_bias"] is False
    assert written["head_dim"] == hybrid.model.layers[0].self_attn.head_dim  # 4.57's attention and RoPE take head_dim from here


@pytest.mark.parametrize("name", list(SOURCES))
def test_config_json_carries_what_vllm_reads(name, tmp_path):
    """Each attribute vLLM's bamba.py reads (docs/loaders.md lists them with their lines) equals the value the
    hybrid really has, read with vLLM's own fallbacks."""
    source, hybrid, _, written = _saved(name, tmp_path)
    rope, src = _true_rope(source), source.config
    # BambaAttentionDecoderLayer
    assert written.get("rope_theta", 10000) == rope["rope_theta"]
    head_dim = written["hidden_size"] // written["num_attention_heads"]  # vLLM ignores config.head_dim
    assert head_dim == hybrid.model.layers[0].self_attn.head_dim
    rotary_dim = head_dim * written["partial_rotary_factor"] if "partial_rotary_factor" in written else head_dim
    assert rotary_dim == head_dim
    scaling = written.get("rope_scaling")
    if rope["rope_type"] == "default":
        assert not scaling  # get_rope: plain RotaryEmbedding
    else:  # get_rope reads rope_scaling["rope_type"] and, for llama3, these four
        for key in ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert scaling[key] == rope[key], key
    assert written.get("max_position_embeddings", 8192) == src.max_position_embeddings
    assert (written["num_attention_heads"], written["num_key_value_heads"]) == (
        src.num_attention_heads, src.num_key_value_heads)
    # BambaMLP, norms, embeddings
    assert written["hidden_act"] == "silu" and written["intermediate_size"] == src.intermediate_size
    assert written["rms_norm_eps"] == src.rms_norm_eps and written["vocab_size"] == src.vocab_size
    # BambaModel: layers_block_type comes from attn_layer_indices
    assert written["attn_layer_indices"] == [0, 2] and written["num_hidden_layers"] == 4
    # BambaMixerDecoderLayer -> MambaMixer2, against the hybrid's own mixer modules
    mixer = hybrid.model.layers[1].mamba
    assert written["mamba_d_state"] == mixer.ssm_state_size
    assert written["mamba_d_conv"] == mixer.conv_kernel_size
    assert written["mamba_expand"] * written["hidden_size"] == mixer.intermediate_size
    assert written["mamba_conv_bias"] == (mixer.conv1d.bias is not None)
    assert written["mamba_proj_bias"] == (mixer.in_proj.bias is not None)
    assert written["mamba_n_groups"] == mixer.n_groups
    assert (written["mamba_n_heads"], written["mamba_d_head"]) == (mixer.num_heads, mixer.head_dim)
    assert written["mamba_chunk_size"] == mixer.chunk_size


def test_what_vllm_cannot_read_is_named_in_the_warnings():
    """vLLM's Bamba has no attention biases and no tied lm_head; transformers 4.x normalises mixer output over all
    groups. The warnings name exactly the ones that apply."""
    def notes(family, n_groups=None, **source):
        hybrid = convert_to_hybrid(make_tiny(family, **source), ConversionConfig(layers=[1], n_groups=n_groups))
        return " | ".join(loader_warnings(hybrid.config))

    tied_llama = notes("llama")
    assert "transformers < 5" in tied_llama and "lm_head" in tied_llama and "bias" not in tied_llama
    qwen = notes("qwen2")
    assert "q/k/v biases" in qwen and "lm_head" not in qwen
    assert notes("llama", n_groups=1, tie_word_embeddings=False) == ""


@pytest.mark.parametrize("name", list(SOURCES))
def test_transformers_5_loads_the_folder_exactly_and_rad_resaves_it_byte_for_byte(name, tmp_path):
    _, hybrid, out, written = _saved(name, tmp_path, init="random")  # mixers that matter
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.rope_parameters == hybrid.config.rope_parameters
    assert loaded.config.to_json_string() == hybrid.config.to_json_string()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, hybrid(IDS).logits, rtol=0, atol=1e-6)
    again = save_hybrid(loaded, word_tokenizer(), tmp_path / "again", conversion_record("x", loaded, ConversionConfig()))
    assert (again / "config.json").read_text() == (out / "config.json").read_text()
    assert set(LOADER_KEYS) & set(written)


def test_rad_info_flags_a_folder_resaved_without_the_loader_keys(tmp_path):
    from rad.models.loading import load_model

    _, _, out, _ = _saved("llama-theta-1e5", tmp_path)
    assert not any("lacks" in n for n in model_info(load_model(str(out), device="cpu").model).loader_notes)
    plain = tmp_path / "resaved"  # e.g. after fine-tuning with plain transformers 5
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(plain)
    word_tokenizer().save_pretrained(plain)
    assert not set(LOADER_KEYS) & set(json.loads((plain / "config.json").read_text()))
    info = model_info(load_model(str(plain), device="cpu").model)
    assert any("lacks the top-level rope_theta, partial_rotary_factor" in n for n in info.loader_notes)
    assert "loaders      exact with transformers >= 5" in format_info(info)
    assert model_info(make_tiny("llama")).loader_notes == []  # not a hybrid: nothing to say


def test_rad_convert_logs_the_loader_warning(tmp_path, caplog):
    make_tiny("qwen2", **SOURCES["qwen2-biases"][1]).save_pretrained(tmp_path / "src")
    word_tokenizer().save_pretrained(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="rad.models.convert"):
        result = convert_model(str(tmp_path / "src"), "1,3", tmp_path / "hybrid", device="cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("q/k/v biases" in w and "docs/loaders.md" in w for w in warnings), warnings
    assert json.loads((result.out / "config.json").read_text())["rope_theta"] == 1000000.0


def test_distilled_student_keeps_the_loader_keys(tmp_path):
    from rad.distill.config import DistillConfig
    from rad.distill.summary import save_student

    _, hybrid, _, written = _saved("llama3-scaling", tmp_path)
    dest = save_student(hybrid, word_tokenizer(), tmp_path / "student", None, DistillConfig(hybrid="h", out="o"))
    student = json.loads((dest / "config.json").read_text())
    assert {k: student[k] for k in LOADER_KEYS} == {k: written[k] for k in LOADER_KEYS}
