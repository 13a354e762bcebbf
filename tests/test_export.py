"""`rad export`: the padded hybrid computes the same function (torch, float64 reference), the GGUF carries the
model's metadata and tensors back, and llama.cpp (when installed) reproduces transformers' logits."""

from __future__ import annotations

import os

import pytest
import torch

from rad.errors import RadError
from rad.export.llama_cpp import llama_cpp_available
from rad.export.padding import padded_hybrid
from rad.models.convert import ConversionConfig, convert_to_hybrid

from .conftest import make_tiny


def _trained_like(hybrid, seed: int = 0):
    """Random mixer weights everywhere (the `random` init leaves in_proj non-zero, but A, dt and the norm gains
    deserve random values too): padding must hold for any weights, not only an init's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hybrid.named_parameters():
            if ".mamba." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (0.5 if "norm" in name else 0.0))
    return hybrid


def tiny_hybrid_of(family: str, layers=(1, 2), n_groups="kv", d_state=8, seed=0, **overrides):
    if family == "llama":
        overrides.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    model = make_tiny(family, seed=seed, **overrides)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=list(layers), init="random", n_groups=n_groups,
                                                       d_state=d_state))
    return _trained_like(hybrid, seed).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("n_groups, d_state", [("kv", 8), ("heads", 4), (1, 16)])
def test_padding_to_expand_two_leaves_the_function_unchanged(family, n_groups, d_state):
    hybrid = tiny_hybrid_of(family, n_groups=n_groups, d_state=d_state).double()
    padded = padded_hybrid(hybrid)
    c, p = hybrid.config, padded.config
    assert p.mamba_n_heads * p.mamba_d_head == 2 * c.hidden_size == 2 * c.mamba_n_heads * c.mamba_d_head
    assert p.mamba_n_groups == 2 * c.mamba_n_groups
    ids = torch.randint(3, c.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as batched generation makes it
    with torch.no_grad():
        want = hybrid(input_ids=ids, attention_mask=mask).logits
        got = padded(input_ids=ids, attention_mask=mask).logits
    # float64: the only difference is the order of sums with added exact zeros
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert want.abs().max() > 0.1  # the mixers are not silent


def test_padding_refuses_what_whole_groups_cannot_fill():
    from rad.models.mixers.mamba2 import Mamba2Geometry, padded_geometry

    g = Mamba2Geometry(hidden=48, heads=6, head_dim=8, n_groups=2, d_state=8)
    assert padded_geometry(g, 96).heads == 12 and padded_geometry(g, 96).n_groups == 4
    with pytest.raises(RadError, match="cannot be padded"):
        padded_geometry(g, 56)  # one head more: not a whole group of 3 heads
    with pytest.raises(RadError, match="cannot be padded"):
        padded_geometry(g, 40)  # narrower


def word_tokenizer_gguf(path, vocab_size: int = 96):
    """A GGUF holding only a tokenizer for the tiny models' 96 word ids (llama.cpp loads it; tests feed ids)."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    tokens = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(3, vocab_size))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (vocab_size - 3))
    writer.add_token_merges(["w 3"])  # llama.cpp needs a merges array; tests feed ids, never text
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _export(model, tmp_path, name="m.gguf", type_="f32"):
    from rad.export.config import ExportConfig
    from rad.export.gguf import tokenizer_fields, write_gguf

    tok = word_tokenizer_gguf(tmp_path / "tok.gguf")
    config = ExportConfig(model="unused", out=str(tmp_path / name), type=type_, tokenizer_gguf=str(tok))
    return write_gguf(model, tmp_path / name, config, tokenizer_fields(tok, model.config.vocab_size))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_carries_the_hybrids_metadata_and_tensors(family, tmp_path):
    import gguf

    hybrid = tiny_hybrid_of(family)
    result = _export(hybrid, tmp_path)
    reader = gguf.GGUFReader(result.path)
    f = {k: v.contents() for k, v in reader.fields.items()}
    c = hybrid.config
    assert f["general.architecture"] == "granitehybrid" and result.arch == "granitehybrid"
    assert f["granitehybrid.block_count"] == c.num_hidden_layers
    kv = f["granitehybrid.attention.head_count_kv"]
    assert [i for i, n in enumerate(kv) if n == 0] == [1, 2]  # the converted layers are recurrent
    assert f["granitehybrid.ssm.inner_size"] == 2 * c.hidden_size
    assert f["granitehybrid.ssm.group_count"] == 2 * c.mamba_n_groups
    assert f["granitehybrid.ssm.time_step_rank"] == 2 * c.mamba_n_heads
    assert f["granitehybrid.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert len(f["tokenizer.ggml.tokens"]) == c.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not c.tie_word_embeddings)
    state = hybrid.state_dict()
    # ggml shapes are numpy's reversed; the data round-trips exactly in f32
    emb = tensors["token_embd.weight"]
    assert torch.equal(torch.from_numpy(emb.data.copy()).reshape(c.vocab_size, c.hidden_size),
                       state["model.embed_tokens.weight"])
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy()).reshape(-1, c.hidden_size)
    heads, hd = c.num_attention_heads, c.head_dim
    unpermuted = q.reshape(heads, hd // 2, 2, c.hidden_size).swapaxes(1, 2).reshape(q.shape)
    assert torch.equal(unpermuted, state["model.layers.0.self_attn.q_proj.weight"])
    a = torch.from_numpy(tensors["blk.1.ssm_a"].data.copy()).flatten()
    assert torch.allclose(a[: c.mamba_n_heads], -torch.exp(state["model.layers.1.mamba.A_log"]))
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    assert result.padded_heads == c.mamba_n_heads


def test_gguf_types_quantise_only_the_matmul_weights(tmp_path):
    import gguf

    hybrid = tiny_hybrid_of("qwen2", hidden_size=64, num_attention_heads=8, intermediate_size=96)
    reader = gguf.GGUFReader(_export(hybrid, tmp_path, "q.gguf", "q8_0").path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 96
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.1.ssm_in.weight"] == gguf.GGMLQuantizationType.Q8_0
    for name in ("blk.1.ssm_conv1d.weight", "blk.1.ssm_a", "blk.1.ssm_norm.weight", "blk.0.attn_norm.weight",
                 "blk.0.attn_q.bias"):
        assert types[name] == gguf.GGMLQuantizationType.F32, name


def test_export_refuses_what_llama_cpp_cannot_compute(tmp_path):
    from rad.export.gguf import check_expressible

    scaled = convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=[1], init="rad"))  # llama3 RoPE scaling
    with pytest.raises(RadError, match="llama3"):
        check_expressible(scaled.config)
    from transformers import GPT2Config

    with pytest.raises(RadError, match="gpt2"):
        check_expressible(GPT2Config(n_layer=1))


# CI installs llama-cpp-python (`make setup-serve`) and sets RAD_REQUIRE_LLAMA_CPP=1: there these tests never skip.
needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_available() and os.environ.get("RAD_REQUIRE_LLAMA_CPP") != "1",
    reason="llama-cpp-python is not installed (make setup-serve)")


@needs_llama_cpp
@pytest.mark.parametrize("family, n_groups, d_state", [("qwen2", "kv", 8), ("llama", "heads", 8), ("mistral", 1, 16)])
def test_llama_cpp_reproduces_the_hybrids_logits_and_greedy_tokens(family, n_groups, d_state, tmp_path):
    """The tiny hybrid (random mixer weights, so every mixer matters) in llama.cpp from its f32 GGUF, against
    transformers in float32: logits within 2e-4 (an f32 KV cache; summation order differs) and 24 greedy tokens
    equal."""
    import numpy as np

    from rad.export.llama_cpp import greedy_ids, logits_of, open_gguf

    hybrid = tiny_hybrid_of(family, n_groups=n_groups, d_state=d_state, hidden_size=64, num_attention_heads=8,
                            intermediate_size=96)
    path = _export(hybrid, tmp_path).path
    ids = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = open_gguf(path, n_ctx=128, threads=1, logits_all=True, kv_cache="f32")
    got = logits_of(llm, ids)
    with torch.no_grad():
        want = hybrid(torch.tensor([ids])).logits[0].numpy()
        skipped = hybrid.model.layers[1].mamba.out_proj.weight.abs().sum()
    assert skipped > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    with torch.no_grad():
        expected = hybrid.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert greedy_ids(llm, ids, 24) == expected


def _chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def check_in_llama_cpp(model, tokenizer, alias: str, tmp_path, atol: float, new_tokens: int = 128):
    """Export `model` (f32) with `alias`'s tokenizer; llama.cpp's logits on a chat prompt within `atol` of
    transformers' (float32, an f32 KV cache) and the greedy answer (up to `new_tokens`, ending at EOS as a user
    sees it) identical."""
    import numpy as np

    from rad.export.config import ExportConfig
    from rad.export.gguf import tokenizer_fields, tokenizer_source, write_gguf
    from rad.export.llama_cpp import greedy_ids, logits_of, open_gguf

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = ExportConfig(model=alias, out=str(tmp_path / "m.gguf"))
    with tokenizer_source(alias, config) as tok:
        path = write_gguf(model, tmp_path / "m.gguf", config, tokenizer_fields(tok, model.config.vocab_size)).path
    ids = _chat_ids(tokenizer, "Write a Python function that returns the n-th Fibonacci number.")
    llm = open_gguf(path, n_ctx=512, logits_all=True, kv_cache="f32")
    try:
        got = logits_of(llm, ids)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id or 0)[0, len(ids):].tolist()
        assert len(expected) > 16  # an answer, not an immediate stop
        assert greedy_ids(llm, ids, new_tokens, stop={tokenizer.eos_token_id}) == expected
    finally:
        llm.close()
    return path


@needs_llama_cpp
@pytest.mark.slow
def test_default_model_and_its_hybrid_run_exactly_in_llama_cpp(default_model, tmp_path, capsys):
    """SmolLM2-135M (the teacher, as `llama`) and its hybrid at k = 15 of 30 (uniform layers, `mil` init, so every
    mixer is non-zero; as `granitehybrid`): measured max |dlogit| 1.1e-3 on logits of scale 40."""
    import copy

    from rad.models.layers import parse_layers

    teacher = default_model.model
    path = check_in_llama_cpp(teacher, default_model.tokenizer, "smollm2-135m", tmp_path / "t", atol=5e-3)

    # `rad generate --engine llama.cpp` on that file prints transformers' greedy text (a plain completion)
    from rad.cli import main

    prompt = "def fibonacci(n):"
    ids = default_model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = teacher.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    capsys.readouterr()
    assert main(["generate", str(path), "--engine", "llama.cpp", "--prompt", prompt, "--max-new-tokens", "24",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == default_model.tokenizer.decode(new, skip_special_tokens=True).strip()
    layers = parse_layers("uniform:15", teacher.config.num_hidden_layers)
    hybrid = convert_to_hybrid(copy.deepcopy(teacher), ConversionConfig(layers=layers, init="mil")).eval()
    check_in_llama_cpp(hybrid, default_model.tokenizer, "smollm2-135m", tmp_path / "h", atol=5e-3)



@needs_llama_cpp
def test_k_quants_come_from_llama_cpps_quantiser_and_load(tmp_path):
    """--type q4_k_m: rad's f32 file through llama.cpp's quantiser; the result loads and runs in llama.cpp, says
    it is Q4_K_M, and no temporary file is left beside it."""
    import gguf
    import numpy as np

    from rad.export.config import ExportConfig
    from rad.export.gguf import _write_through_quantiser, tokenizer_fields
    from rad.export.llama_cpp import logits_of, open_gguf

    hybrid = tiny_hybrid_of("qwen2", hidden_size=256, num_attention_heads=8, intermediate_size=512)
    tok = word_tokenizer_gguf(tmp_path / "tok.gguf")
    out = tmp_path / "m.gguf"
    config = ExportConfig(model="unused", out=str(out), type="q4_k_m", tokenizer_gguf=str(tok))
    result = _write_through_quantiser(hybrid, out, config, tokenizer_fields(tok, hybrid.config.vocab_size))
    assert result.type == "q4_k_m" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "tok.gguf"]
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert gguf.GGMLQuantizationType.Q4_K in {t.tensor_type for t in reader.tensors}
    llm = open_gguf(out, n_ctx=64, threads=1, logits_all=True)
    try:
        logits = logits_of(llm, list(range(3, 40)))
    finally:
        llm.close()
    assert np.isfinite(logits).all() and logits.shape == (37, 96)
