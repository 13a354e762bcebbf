"""Skipping attention equals an independent construction: the same model with o_proj zeroed."""

import copy

import pytest
import torch
from transformers import DynamicCache

from rad.errors import RadError
from rad.models.skip import skip_attention

from .conftest import FAMILIES, make_tiny


def _zeroed_o_proj(model, layers):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in layers:
            attn = ref.model.layers[i].self_attn
            attn.o_proj.weight.zero_()
            if attn.o_proj.bias is not None:
                attn.o_proj.bias.zero_()
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_skip_equals_zeroed_output_projection(family):
    model = make_tiny(family)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        with skip_attention(model, [0, 2]):
            skipped = model(ids).logits
        reference = _zeroed_o_proj(model, [0, 2])(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(skipped, reference, rtol=0, atol=1e-6)
    assert (skipped - full).abs().max() > 1e-3  # skipping changed something
    torch.testing.assert_close(after, full, rtol=0, atol=0)  # and was undone


@pytest.mark.parametrize("family", FAMILIES)
def test_nesting_and_restoring_after_an_exception(family):
    model = make_tiny(family)
    originals = [layer.self_attn for layer in model.model.layers]
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with skip_attention(model, [1]):
            with skip_attention(model, [1, 3]):
                inner = model(ids).logits
            middle = model(ids).logits
        ref_inner = _zeroed_o_proj(model, [1, 3])(ids).logits
        ref_middle = _zeroed_o_proj(model, [1])(ids).logits
    torch.testing.assert_close(inner, ref_inner, rtol=0, atol=1e-6)
    torch.testing.assert_close(middle, ref_middle, rtol=0, atol=1e-6)
    with pytest.raises(ZeroDivisionError), skip_attention(model, [0, 2]):
        raise ZeroDivisionError
    assert [layer.self_attn for layer in model.model.layers] == originals


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_layers_leave_their_kv_cache_untouched(family):
    model = make_tiny(family)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        before = [(cache.layers[i].keys.clone(), cache.layers[i].values.clone()) for i in range(4)]
        with skip_attention(model, [1, 2]):
            model(torch.tensor([[5]]), cache=cache, use_cache=True, position_ids=torch.tensor([[10]]))
    for i in (1, 2):
        torch.testing.assert_close(cache.layers[i].keys, before[i][0], rtol=0, atol=0)
        torch.testing.assert_close(cache.layers[i].values, before[i][1], rtol=0, atol=0)
    for i in (0, 3):
        assert cache.layers[i].keys.shape[-2] == 11


def test_bad_skip_layers():
    model = make_tiny("llama")
    with pytest.raises(RadError, match="out of range|layers 0..3"), skip_attention(model, [4]):
        pass
