"""Every public API docstring opens with a runnable example: run them all (tiny models, fast)."""

from __future__ import annotations

import doctest
import importlib

import pytest

API_MODULES = [
    "patchscan",
    "patchscan.models.loading",
    "patchscan.models.view",
    "patchscan.api.states",
    "patchscan.api.targets",
    "patchscan.api.readouts",
    "patchscan.api.results",
    "patchscan.api.lenses",
    "patchscan.api.intervene",
    "patchscan.runs.row_schema",
    "patchscan.grids",
]


@pytest.mark.parametrize("name", API_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
