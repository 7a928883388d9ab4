"""A quiet set-up (issue 26, point 7): the engine's own use of transformers warns about nothing it
deprecates, and transformers is pinned to the range the suite passed on."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from patchscan.engine import Patch, generate, patched_logits
from patchscan.engine.decoding import plain_generate
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[2]


def test_the_engine_hands_and_reads_kv_caches_without_a_deprecation(monkeypatch):
    """Prefix reuse, shared and padded decoding, the greedy head and the model's own logits: none
    passes or reads a cache under a deprecated name (transformers 5 renamed past_key_values to cache)."""
    from transformers.utils import generic

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(str(msg)))
    view = tiny("tiny_llama")
    ids = tuple(view.encode("The capital city of x is"))
    patches = [Patch(target_ids=ids, target_position=4, target_layer=k, vector=torch.ones(view.width)) for k in (0, 2)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        warnings.filterwarnings("error", category=DeprecationWarning, module="transformers")
        patched_logits(view, patches)
        generate(view, patches, max_new_tokens=4, share_lower_blocks=True)
        generate(view, patches, max_new_tokens=4, share_lower_blocks=False)
        plain_generate(view, [ids, ids[:3]], max_new_tokens=3)
    assert not [m for m in said if "past_key_values" in m], said


def test_transformers_is_pinned_to_a_range_holding_the_installed_version():
    """An upper bound, raised deliberately after the suite passes on a newer transformers."""
    tomllib = pytest.importorskip("tomllib")
    import transformers
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d) for d in deps if Requirement(d).name == "transformers")
    assert any(spec.operator in ("<", "<=") for spec in pin.specifier), pin
    assert pin.specifier.contains(transformers.__version__), (pin, transformers.__version__)
