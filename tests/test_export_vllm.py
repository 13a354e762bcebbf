"""`rad export --format vllm`: a folder vLLM's Bamba loads, checked against vLLM's own shape rules.

vLLM itself needs a GPU and is not installed here; what is tested is the folder (it loads in transformers and
computes the hybrid's logits exactly, with its head written out) and the rules, case by case on real shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from rad.cli import main
from rad.errors import RadError
from rad.export import ExportConfig, export, vllm_problems
from rad.models.convert import ConversionConfig, conversion_record, convert_to_hybrid, save_hybrid
from rad.models.loading import load_model

from .conftest import make_tiny, word_tokenizer


def _hybrid_folder(tmp_path: Path, family: str = "llama", layers=(1, 3)) -> Path:
    src = make_tiny(family)
    cfg = ConversionConfig(layers=list(layers), init="random", seed=2)  # non-zero mixers: a real test of the copy
    folder = tmp_path / f"{family}-hybrid"
    save_hybrid(convert_to_hybrid(src, cfg), word_tokenizer(), folder, conversion_record("tiny", src, cfg))
    return folder


def test_the_vllm_folder_computes_the_hybrid_with_its_head_written_out(tmp_path):
    folder = _hybrid_folder(tmp_path)  # tiny Llama: tied embeddings, as SmolLM2
    result = export(ExportConfig(model=str(folder), out=str(tmp_path / "vllm"), format="vllm"))
    out = Path(result.path)
    with safe_open(out / "model.safetensors", "pt") as f:
        head, embed = f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight")
    torch.testing.assert_close(head, embed, rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["attn_rotary_emb"] == config["hidden_size"] // config["num_attention_heads"]
    assert config["mamba_n_heads"] * config["mamba_d_head"] == config["mamba_expand"] * config["hidden_size"]
    assert json.loads((out / "rad_export.json").read_text())["tensor_parallel_sizes"] == [1, 2]  # 6 heads, 2 kv
    assert (out / "rad_conversion.json").read_bytes() == (folder / "rad_conversion.json").read_bytes()

    original, exported = load_model(str(folder)).model, load_model(str(out)).model
    assert exported.lm_head.weight.data_ptr() != exported.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(3, 96, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)


def _config(**kw):
    """Qwen2.5-Coder-0.5B's shapes, converted with rad's default geometry (groups = kv heads)."""
    base = dict(model_type="bamba", attention_bias=False, mlp_bias=False, hidden_act="silu", hidden_size=896,
                num_attention_heads=14, num_key_value_heads=2, head_dim=64, mamba_n_heads=14, mamba_d_head=64,
                mamba_n_groups=2, mamba_expand=1, mamba_chunk_size=64, mamba_d_conv=4)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("change, tp, problem", [
    ({}, 1, None),
    ({}, 2, None),
    ({}, 4, "14 attention heads do not split over 4 GPUs"),
    ({"num_key_value_heads": 3, "num_attention_heads": 12, "hidden_size": 768, "mamba_n_heads": 12,
      "mamba_n_groups": 3}, 2, "3 key/value heads neither split over nor replicate onto 2 GPUs"),
    ({"mamba_n_groups": 7}, 2, "7 mamba groups neither split over 2 GPUs nor are 1"),
    ({"mamba_n_groups": 1}, 2, None),  # one group is replicated
    ({"attention_bias": True}, 1, "q/k/v biases"),
    ({"head_dim": 128}, 1, "vLLM's Bamba takes head_dim = hidden / heads"),
    ({"mamba_chunk_size": 48}, 1, "not a power of 2"),
    ({"mamba_d_conv": 8}, 1, "outside vLLM's causal_conv1d kernels"),
    ({"mamba_n_heads": 12}, 1, "!= mamba_expand x hidden"),
    ({"hidden_act": "gelu"}, 1, "silu only"),
])
def test_vllms_shape_rules(change, tp, problem):
    problems = vllm_problems(_config(**change), tp)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_what_vllm_cannot_serve_is_refused_before_anything_is_written(tmp_path, caplog):
    qwen = _hybrid_folder(tmp_path, "qwen2")
    llama = _hybrid_folder(tmp_path)
    plain = tmp_path / "plain"
    make_tiny("llama").save_pretrained(plain)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cases = [
        ([str(qwen)], "q/k/v biases"),
        ([str(llama), "--type", "q8_0"], "is a GGUF type"),
        ([str(llama), "--tensor-parallel-size", "4"], "6 attention heads do not split over 4 GPUs"),
        ([str(plain)], "writes rad hybrids"),
        ([str(tmp_path / "missing")], "Unknown model"),
    ]
    for args, message in cases:
        caplog.clear()
        assert main(["export", *args, "--format", "vllm", "--out", str(tmp_path / "o")]) == 2, args
        assert any(message in r.getMessage() for r in caplog.records if r.levelname == "ERROR"), (args, message)
        assert not (tmp_path / "o").exists()
    assert main(["export", str(llama), "--format", "vllm", "--out", str(tmp_path / "foreign")]) == 2
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert main(["export", str(llama), "--format", "vllm", "--out", str(tmp_path / "o")]) == 0
    with pytest.raises(RadError, match="already exists; pass --overwrite"):
        export(ExportConfig(model=str(llama), out=str(tmp_path / "o"), format="vllm"))
    assert export(ExportConfig(model=str(llama), out=str(tmp_path / "o"), format="vllm", overwrite=True,
                               type="bf16")).dtype == "bf16"
