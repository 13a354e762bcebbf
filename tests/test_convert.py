"""Conversion to a Bamba hybrid on tiny random models of every supported family."""

import pytest
import torch
from transformers import BambaForCausalLM, GPT2Config, GPT2LMHeadModel

from rad.errors import RadError
from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.mixers.mamba2 import RAD_GATE_GAIN
from rad.models.naming import hybrid_name
from rad.models.skip import skip_attention

from .conftest import FAMILIES, make_tiny

IDS = torch.randint(3, 96, (2, 37), generator=torch.Generator().manual_seed(0))


def test_tiny_qwen2_has_q_k_v_biases_and_an_untied_head():
    """What the Qwen2 cases of the exactness tests rely on: non-zero q/k/v biases and a head of its own."""
    model = make_tiny("qwen2")
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    attn = model.model.layers[0].self_attn
    assert all(torch.count_nonzero(getattr(attn, p).bias) > 0 for p in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_layers_converted_is_the_same_model(family):
    model = make_tiny(family)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[]))
    assert isinstance(hybrid, BambaForCausalLM)
    with torch.no_grad():
        diff = (hybrid(IDS).logits - model(IDS).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_name_map_covers_every_parameter_of_a_hybrid(family):
    """`hybrid_name` is what both conversion and the teacher's weight sharing go by: every source parameter
    (but a replaced attention) has a twin of equal value, and only the new mixers lack a source."""
    from rad.distill.modules import select_trainable, share_frozen_weights

    converted = [1, 3]
    model = make_tiny(family)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=converted))
    source = dict(model.named_parameters(remove_duplicate=False))
    target = dict(hybrid.named_parameters(remove_duplicate=False))

    def replaced(name):
        parts = name.split(".")
        return name.startswith("model.layers.") and int(parts[2]) in converted and parts[3] == "self_attn"

    twins = {name: hybrid_name(name) for name in source if not replaced(name)}
    for name, twin in twins.items():
        assert twin in target, f"{name} -> {twin} is not a hybrid parameter"
        assert torch.equal(target[twin], source[name]), twin
    unmapped = set(target) - set(twins.values())
    mixers = {n for n in unmapped if n.split(".")[3] == "mamba" and int(n.split(".")[2]) in converted}
    # Bamba's attention_bias also gives o_proj a bias, which Qwen2 lacks (conversion zeroes it).
    extra = {f"model.layers.{i}.self_attn.o_proj.bias" for i in (0, 2)} if family == "qwen2" else set()
    assert unmapped - mixers == extra
    assert {int(n.split(".")[2]) for n in mixers} == set(converted)

    teacher = make_tiny(family)  # the same values as `model`: every frozen twin is shared
    select_trainable(hybrid, "mixers")
    share_frozen_weights(teacher, hybrid)
    for name, param in teacher.named_parameters(remove_duplicate=False):
        if not replaced(name):
            assert param.data_ptr() == target[hybrid_name(name)].data_ptr(), name


GEOMETRIES = [("heads", None), ("kv", None), ("kv", 4), (3, 5)]  # tiny models: 6 heads, 2 KV heads, head_dim 8


@pytest.mark.parametrize("init", ["rad", "rad-zero-in-proj"])
@pytest.mark.parametrize("n_groups, d_state", GEOMETRIES)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_rad_init_equals_skipping_those_layers(family, n_groups, d_state, init):
    model = make_tiny(family)
    layers = [0, 2]
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=layers, init=init, n_groups=n_groups, d_state=d_state))
    groups = {"heads": 6, "kv": 2}.get(n_groups, n_groups)
    mixer = hybrid.model.layers[0].mamba
    assert (mixer.n_groups, mixer.ssm_state_size) == (groups, d_state or 8)
    with torch.no_grad(), skip_attention(model, layers):
        draft = model(IDS).logits
    with torch.no_grad():
        diff = (hybrid(IDS).logits - draft).abs().max().item()
    assert diff <= 1e-5
    for i in layers:
        mixer = hybrid.model.layers[i].mamba
        assert torch.count_nonzero(mixer.in_proj.weight) == 0  # the exact zero: the gate z = 0
        assert torch.all(mixer.norm.weight == (RAD_GATE_GAIN if init == "rad" else 1.0))
        torch.testing.assert_close(mixer.out_proj.weight, model.model.layers[i].self_attn.o_proj.weight, rtol=0, atol=0)


def test_rad_init_scales_the_papers_first_gradient_by_its_gain():
    """From the exact zero the first gradient reaches in_proj (the gain's is 0: it scales a zero output), and
    with the same geometry and seed the `rad` init's is the literal init's times RAD_GATE_GAIN: the same first
    direction, a tenth of the jump."""
    model = make_tiny("llama")
    grads = {}
    for init in ("rad", "rad-zero-in-proj"):
        hybrid = convert_to_hybrid(model, ConversionConfig(layers=[1], init=init, n_groups="heads"))
        hybrid.train()
        hybrid(IDS, labels=IDS).loss.backward()
        mixer = hybrid.model.layers[1].mamba
        assert mixer.norm.weight.grad.abs().sum() == 0, init
        grads[init] = mixer.in_proj.weight.grad.clone()
        assert grads[init].abs().sum() > 0, init
    expected = RAD_GATE_GAIN * grads["rad-zero-in-proj"]  # fp32 sums: 1e-5 of the largest entry
    torch.testing.assert_close(grads["rad"], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_mil_init_places_every_tensor():
    model = make_tiny("llama")  # 6 heads, 2 KV heads (GQA groups of 3), head_dim 8
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[1, 3], init="mil"))
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    d_inner = heads * hd
    for i in (1, 3):
        attn, mixer = model.model.layers[i].self_attn, hybrid.model.layers[i].mamba
        assert (mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size) == (heads, hd, heads, hd)
        w = mixer.in_proj.weight
        z, x, b, c, dt = torch.split(w, [d_inner, d_inner, heads * hd, heads * hd, heads])
        for h in range(heads):
            g = h // (heads // kv_heads)
            for p in range(hd):  # value by value, row by row
                assert torch.equal(x[h * hd + p], attn.v_proj.weight[g * hd + p])
                assert torch.equal(b[h * hd + p], attn.k_proj.weight[g * hd + p])
                assert torch.equal(c[h * hd + p], attn.q_proj.weight[h * hd + p])
        assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        assert z.abs().sum() > 0 and dt.abs().sum() > 0  # random, not copied


def test_mil_hybrid_runs_forward_backward_generate():
    model = make_tiny("qwen2")
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[0, 3], init="mil"))
    hybrid.train()
    out = hybrid(IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in hybrid.named_parameters() if ".mamba." in n)
    hybrid.eval()
    gen = hybrid.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 13)


def test_inits_are_seeded_and_differ():
    model = make_tiny("llama")
    a = convert_to_hybrid(model, ConversionConfig(layers=[2], init="random", seed=3))
    b = convert_to_hybrid(model, ConversionConfig(layers=[2], init="random", seed=3))
    c = convert_to_hybrid(model, ConversionConfig(layers=[2], init="random", seed=4))
    wa, wb, wc = (m.model.layers[2].mamba.in_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    mixer = a.model.layers[2].mamba
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6)).all()  # Mamba2's dt range
    a_values = torch.exp(mixer.A_log)
    assert ((a_values >= 1) & (a_values <= 16)).all()


def test_each_init_gets_its_default_geometry_unless_one_is_given():
    model = make_tiny("llama")  # 6 heads, 2 KV heads, head_dim 8

    def dims(**kw):
        mixer = convert_to_hybrid(model, ConversionConfig(layers=[1], **kw)).model.layers[1].mamba
        return mixer.n_groups, mixer.ssm_state_size

    # rad: one group per KV head, half the head size (docs/benchmarks.md); the others: a group per head.
    assert dims(init="rad") == (2, 4)
    assert dims(init="mil") == dims(init="random") == dims(init="rad-zero-in-proj") == (6, 8)
    assert dims(init="rad", n_groups="heads") == (6, 8)  # groups given: d_state = head_dim unless given too
    assert dims(init="rad", d_state=3) == (2, 3)
    assert dims(init="random", d_state="half") == (6, 4)
    shapes = {init: {n: p.shape for n, p in convert_to_hybrid(model, ConversionConfig(
        layers=[1], init=init, n_groups="heads")).named_parameters()} for init in ("rad", "mil", "random")}
    assert shapes["rad"] == shapes["mil"] == shapes["random"]  # like with like when the geometry is given


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(RadError, match="supported families are llama, qwen2, mistral"):
        convert_to_hybrid(gpt2, ConversionConfig(layers=[0]))


@pytest.mark.parametrize("layers, words", [([4], "out of range"), ([1, 1], "twice"), ([-1], "out of range")])
def test_bad_layers(layers, words):
    with pytest.raises(RadError, match=words):
        convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached_recomputation_tiny(family):
    model = make_tiny(family)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[0, 2, 3], init="random", seed=1))
    _assert_cached_equals_recomputed(hybrid, IDS[:1, :9], new_tokens=64)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_by_token_equals_full_forward_tiny(family):
    model = make_tiny(family)
    hybrid = convert_to_hybrid(model, ConversionConfig(layers=[1, 2], init="mil", chunk_size=16))
    _assert_stepwise_equals_full(hybrid, IDS[:1], atol=2e-5)


def _assert_cached_equals_recomputed(hybrid, prompt, new_tokens):
    with torch.no_grad():
        cached = hybrid.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, min_new_tokens=new_tokens)
        seq = prompt
        for _ in range(new_tokens):
            nxt = hybrid(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def _assert_stepwise_equals_full(hybrid, ids, atol):
    from transformers import DynamicCache

    with torch.no_grad():
        full = hybrid(ids).logits
        cache = DynamicCache(config=hybrid.config)
        steps = []
        for t in range(ids.shape[1]):
            out = hybrid(ids[:, t : t + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[t]]))
            steps.append(out.logits)
        stepwise = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=atol)


@pytest.mark.parametrize("n_groups, d_state", [("kv", None), ("heads", 4), (3, None)])
def test_mil_refuses_a_lean_geometry(n_groups, d_state):
    with pytest.raises(RadError, match="needs n_groups = heads"):
        convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=[1], init="mil", n_groups=n_groups,
                                                               d_state=d_state))


@pytest.mark.parametrize("n_groups, d_state", [(4, None), (0, None), ("two", None), ("kv", 0), (2.5, None)])
def test_a_geometry_that_does_not_fit_is_a_clear_error(n_groups, d_state):
    with pytest.raises(RadError, match="SSM groups|d_state"):
        convert_to_hybrid(make_tiny("llama"), ConversionConfig(layers=[1], n_groups=n_groups, d_state=d_state))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("n_groups, d_state", GEOMETRIES)
def test_info_counts_mixer_and_attention_parameters_by_hand(family, n_groups, d_state):
    """6 heads of 8, 2 KV heads, hidden 48, conv 4: in_proj, conv (+bias), dt/A/D, gated norm, out_proj."""
    from rad.models.convert import conversion_record
    from rad.models.info import format_info, model_info

    model = make_tiny(family)
    config = ConversionConfig(layers=[1, 2], n_groups=n_groups, d_state=d_state)
    hybrid = convert_to_hybrid(model, config)
    g = {"heads": 6, "kv": 2}.get(n_groups, n_groups)
    n = d_state or 8
    d_inner, hidden, heads = 48, 48, 6
    conv_dim = d_inner + 2 * g * n
    mixer = hidden * (2 * d_inner + 2 * g * n + heads) + conv_dim * 4 + conv_dim + 3 * heads + d_inner + d_inner * hidden
    attention = 48 * 48 + 2 * 48 * 16 + 48 * 48 + ((48 + 2 * 16) if family == "qwen2" else 0)
    info = model_info(hybrid)
    assert info.mixer == {"n_groups": g, "d_state": n, "parameters": mixer, "attention_parameters": attention}
    # the measured attention of a kept layer has the same size (Bamba adds a zero o_proj bias for Qwen2)
    kept = sum(p.numel() for name, p in hybrid.model.layers[0].self_attn.named_parameters() if name != "o_proj.bias")
    assert kept == attention
    assert info.parameters["mamba2"] == 2 * mixer
    record = conversion_record("tiny", model, config)
    assert record.geometry == {"n_groups": g, "d_state": n, "d_conv": 4, "mixer_parameters": mixer,
                               "attention_parameters": attention}
    assert f"{mixer / 1e6:.3f}M parameters each vs {attention / 1e6:.3f}M" in format_info(info, record)
