"""The mixer seam (rad.models.mixers): finding converted layers, running a mixer alone, its parameter sets,
the registry, and a kind's pieces agreeing with the model it built."""

import pytest
import torch

from rad.distill.modules import select_trainable
from rad.errors import RadError
from rad.models.convert import ConversionConfig, convert_to_hybrid
from rad.models.layers import decoder_layers
from rad.models.mixers import (
    DEFAULT_MIXER,
    MIXER_KINDS,
    converted_layers,
    init_defaults,
    is_gain_parameter,
    is_mixer_parameter,
    layer_mixer,
    mixer_kind,
    mixer_kind_of,
    mixer_layers,
    mixer_output,
    register_mixer_kind,
)
from rad.models.mixers.mamba2 import Mamba2
from tests.conftest import make_tiny

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def hybrid():
    # `mil` gives non-zero mixer outputs (the RAD inits output exactly 0), so the comparisons below bite.
    return convert_to_hybrid(make_tiny("qwen2"), ConversionConfig(layers=LAYERS, init="mil", seed=1))


def test_converted_layers_and_their_mixers(hybrid):
    assert converted_layers(hybrid) == LAYERS
    mixers = mixer_layers(hybrid)
    assert list(mixers) == LAYERS
    blocks = decoder_layers(hybrid)
    for i in range(len(blocks)):
        assert layer_mixer(blocks[i]) is mixers.get(i)
    assert all(mixer_kind_of(m) is mixer_kind(DEFAULT_MIXER) for m in mixers.values())
    assert converted_layers(make_tiny("llama")) == [] and mixer_layers(make_tiny("llama")) == {}


@pytest.mark.parametrize("padded", [False, True])
def test_mixer_output_is_what_the_models_forward_adds(hybrid, padded):
    """The mixer run alone on the layer's normalised input gives the model forward's mixer output, bit for bit."""
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding, as batched generation feeds it
    seen = {}

    def keep(i):
        def hook(module, args, kwargs, output):
            seen[i] = (kwargs["hidden_states"].detach(), output.detach())
        return hook

    handles = [m.register_forward_hook(keep(i), with_kwargs=True) for i, m in mixer_layers(hybrid).items()]
    try:
        with torch.no_grad():
            hybrid(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    blocks = decoder_layers(hybrid)
    for i in LAYERS:
        normed, expected = seen[i]
        assert normed.shape == expected.shape == (2, 9, hybrid.config.hidden_size)
        with torch.no_grad():
            by_layer = mixer_output(blocks[i], normed, attention_mask=mask)
            by_mixer = mixer_output(mixer_layers(hybrid)[i], normed, attention_mask=mask)
        assert torch.equal(by_layer, expected) and torch.equal(by_mixer, expected)
        assert expected.abs().max() > 0


def test_mixer_output_trains(hybrid):
    normed = torch.randn(1, 5, hybrid.config.hidden_size)
    mixer = mixer_layers(hybrid)[LAYERS[0]]
    mixer_output(mixer, normed).pow(2).sum().backward()
    assert all(p.grad is not None for p in mixer.parameters())
    mixer.zero_grad(set_to_none=True)


def test_parameter_predicates_match_the_trainable_sets(hybrid):
    names = [n for n, _ in hybrid.named_parameters()]
    mixer_names = [n for n in names if is_mixer_parameter(n)]
    kind = mixer_kind()
    assert mixer_names and all(n.startswith(tuple(kind.checkpoint_prefix(i) for i in LAYERS)) for n in mixer_names)
    assert {n for n in names if any(n.startswith(kind.checkpoint_prefix(i)) for i in LAYERS)} == set(mixer_names)
    assert select_trainable(hybrid, "mixers") == mixer_names
    gains = [n for n in names if is_gain_parameter(n)]
    assert gains == [f"{kind.checkpoint_prefix(i)}norm.weight" for i in LAYERS]
    assert not any(is_mixer_parameter(n) for n in names if ".self_attn." in n or ".feed_forward." in n)
    for p in hybrid.parameters():
        p.requires_grad_(True)


def test_kind_pieces_agree_with_the_model_they_built(hybrid):
    kind, mixer = mixer_kind(), mixer_layers(hybrid)[LAYERS[0]]
    source = make_tiny("qwen2").config
    geometry = kind.resolve_geometry(source, "heads", None, 4)
    for key, value in kind.hf_config_fields(geometry, chunk_size=64).items():
        assert getattr(hybrid.config, key) == value, key
    elem = next(hybrid.parameters()).element_size()
    specs = kind.state_specs(mixer)
    state = sum(torch.Size(s.shape).numel() * (torch.empty((), dtype=s.dtype).element_size() if s.dtype else elem)
                for s in specs)
    assert state == geometry.state_bytes(elem)
    assert sum(p.numel() for p in mixer.parameters()) == geometry.parameters()
    assert kind.describe(mixer) == {"n_groups": geometry.n_groups, "d_state": geometry.d_state}


def test_registry():
    assert MIXER_KINDS[DEFAULT_MIXER] is mixer_kind() and isinstance(mixer_kind(), Mamba2)
    with pytest.raises(RadError, match="Unknown mixer kind"):
        mixer_kind("no-such-mixer")
    with pytest.raises(RadError, match="already registered"):
        register_mixer_kind(Mamba2())
    assert init_defaults("rad").norm_lr_scale == 100.0
    with pytest.raises(RadError, match="Unknown init"):
        init_defaults("nope")
