import pytest

from rad.errors import RadError
from rad.models.layers import parse_layers, uniform_layers


def test_uniform_every_other_layer_for_half():
    assert uniform_layers(15, 30) == list(range(1, 30, 2))


@pytest.mark.parametrize("k", [1, 5, 8, 14, 29, 30])
def test_uniform_gives_exactly_k_distinct_layers(k):
    layers = uniform_layers(k, 30)
    assert len(layers) == k and len(set(layers)) == k and all(0 <= i < 30 for i in layers)


def test_parse_list_and_rules():
    assert parse_layers("11,3,7", 30) == [3, 7, 11]
    assert parse_layers("first:3", 30) == [0, 1, 2]
    assert parse_layers("last:2", 30) == [28, 29]
    assert parse_layers("", 30) == []


@pytest.mark.parametrize(
    "spec, words",
    [("3,30", "out of range"), ("3,3", "twice"), ("-1", "out of range"), ("a,b", "comma-separated"),
     ("uniform:31", "out of range"), ("middle:3", "Unknown layer rule")],
)
def test_bad_layer_specs(spec, words):
    with pytest.raises(RadError, match=words):
        parse_layers(spec, 30)
