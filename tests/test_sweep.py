import pytest

from patchscan.errors import UserError
from patchscan.sweep import layer_pairs, parse_layers, parse_positions


def test_layer_specs():
    assert parse_layers("all", 4, "x") == [0, 1, 2, 3]
    assert parse_layers("last", 4, "x") == [3]
    assert parse_layers([0, -1], 4, "x") == [0, 3]
    assert parse_layers("0:10:3", 10, "x") == [0, 3, 6, 9]
    assert parse_layers("range(2, 8, 2)", 10, "x") == [2, 4, 6]
    assert layer_pairs("all", "same", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert layer_pairs([1], "all", 3, 3) == [(1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("spec", [[0, 12], "bogus", "0:99", [1.5]])
def test_bad_layer_specs_name_the_value(spec):
    with pytest.raises(UserError):
        parse_layers(spec, 4, "sweep.source_layers")


def test_positions():
    assert parse_positions("last", 5) == [4]
    assert parse_positions([0, -2], 5) == [0, 3]
    with pytest.raises(UserError, match="7"):
        parse_positions([7], 5)
