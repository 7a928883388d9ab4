"""Sharing blocks 0..ℓ* while decoding (issue 19 part 2): generations equal the naive per-patch
method and the unshared engine token for token, rows really share, and the model is left as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from patchscan.engine import Patch, generate, sharing
from tests.conftest import FAMILY_ARCHS, tiny
from tests.engine.test_offload import model_state, offloaded
from tests.helpers import varied_stops
from tests.reference import naive_generate

NEW = 10


def _grid(view) -> list[Patch]:
    """One target prompt: several target blocks and sources, a source repeated (rows whose
    continuations stay equal), a middle target position, and an unpatched row."""
    torch.manual_seed(0)
    ids = tuple(view.encode("The capital city of x is a"))
    vectors = torch.randn(3, view.width, dtype=view.dtype)
    patches = [
        Patch(target_ids=ids, target_position=4, target_layer=layer, vector=vectors[k])
        for k in range(3)
        for layer in range(view.n_blocks)
    ]
    patches += [Patch(target_ids=ids, target_position=4, target_layer=1, vector=vectors[0]) for _ in range(2)]
    patches += [Patch(target_ids=ids, target_position=2, target_layer=k, vector=vectors[k]) for k in range(2)]
    return patches + [Patch(target_ids=ids, target_position=-1, target_layer=0, vector=None)]


def _block_rows(fn):
    before = dict(sharing.BLOCK_ROWS)
    out = fn()
    return out, {k: sharing.BLOCK_ROWS[k] - before[k] for k in before}


@pytest.mark.parametrize("name", FAMILY_ARCHS)
def test_shared_generation_equals_naive_and_unshared(name):
    view = tiny(name)
    patches = _grid(view)
    naive = [naive_generate(view, p, NEW) for p in patches]
    stops, expected = varied_stops(view, naive, 2)
    plain = generate(view, patches, max_new_tokens=NEW, stops=stops, batch_size=64, share_lower_blocks=False)
    shared, rows = _block_rows(
        lambda: generate(view, patches, max_new_tokens=NEW, stops=stops, batch_size=64, share_lower_blocks=True)
    )
    assert shared == plain == expected
    assert len({len(t) for t in shared}) > 2, "rows finish at different steps"
    assert rows["run"] < 0.9 * rows["plain"], "rows of one continuation must share the blocks below ℓ*"


def test_rows_that_end_at_eos_leave_the_shared_batch(monkeypatch):
    """An EOS token that some rows generate early and others late (or never)."""
    view = tiny("tiny_llama")
    patches = _grid(view)
    full = [naive_generate(view, p, NEW) for p in patches]
    counts: dict[int, int] = {}
    for t in full:
        for tok in set(t[1:-1]):
            counts[tok] = counts.get(tok, 0) + 1
    eos = max(counts, key=counts.get)
    monkeypatch.setattr(view.model.generation_config, "eos_token_id", eos)
    expected = [naive_generate(view, p, NEW) for p in patches]
    shared = generate(view, patches, max_new_tokens=NEW, share_lower_blocks=True, batch_size=64)
    assert shared == expected == generate(view, patches, max_new_tokens=NEW, batch_size=64, share_lower_blocks=False)
    assert 1 < sum(t[-1] == eos for t in shared) < len(shared)


def test_every_row_the_same_shares_everything_below_each_target_block():
    view = tiny("tiny_gpt2")
    ids = tuple(view.encode("The capital city of x"))
    vector = torch.randn(view.width, dtype=view.dtype)
    patches = [Patch(target_ids=ids, target_position=-1, target_layer=view.n_blocks - 1, vector=vector)] * 6
    shared, rows = _block_rows(lambda: generate(view, patches, max_new_tokens=5, share_lower_blocks=True))
    assert shared == [naive_generate(view, patches[0], 5)] * 6
    assert rows["run"] * 6 == rows["plain"], "one row runs for all six"


def test_the_model_is_left_as_it_was_even_after_an_error():
    view = tiny("tiny_neox")
    before = model_state(view.model)
    blocks = list(view.blocks)
    generate(view, _grid(view), max_new_tokens=4, share_lower_blocks=True)
    assert model_state(view.model) == before

    def failing(text):
        if len(text) > 3:
            raise KeyError("stop")
        return False

    patches = _grid(view)
    with pytest.raises(KeyError):
        generate(view, patches, max_new_tokens=6, stops=[failing] * len(patches), share_lower_blocks=True)
    assert model_state(view.model) == before
    assert all(a is b for a, b in zip(view.blocks, blocks))


def test_offloaded_model_shares_as_the_plain_one(tmp_path_factory):
    view, ref = offloaded("tiny_llama", tmp_path_factory), tiny("tiny_llama")
    patches = _grid(ref)
    before = model_state(view.model)
    assert generate(view, patches, max_new_tokens=6, share_lower_blocks=True) == generate(
        ref, patches, 6, share_lower_blocks=False
    )
    assert model_state(view.model) == before


def test_unknown_architecture_decodes_plainly(monkeypatch):
    view = tiny("tiny_qwen2")
    patches = _grid(view)
    monkeypatch.setattr(view, "family", dataclasses.replace(view.family, shared_decoding=False))
    shared, rows = _block_rows(lambda: generate(view, patches, max_new_tokens=5, share_lower_blocks=True))
    assert rows == {"run": 0, "plain": 0}
    assert shared == generate(view, patches, max_new_tokens=5, share_lower_blocks=False)


def test_config_key_is_validated_and_reaches_the_engine():
    from omegaconf import OmegaConf

    from patchscan.errors import UserError
    from patchscan.experiments.base import Experiment
    from patchscan.runs.config_checks import validate

    cfg = OmegaConf.create({"generation": {"share_lower_blocks": "yes"}})
    with pytest.raises(UserError, match="share_lower_blocks"):
        validate(cfg)
    scope = Experiment.__new__(Experiment)
    scope.cfg = OmegaConf.create({"runner": {"batch_size": 8}, "generation": {"share_lower_blocks": True}})
    assert scope.generating()["share_lower_blocks"] is True
