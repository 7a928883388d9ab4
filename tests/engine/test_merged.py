"""Rows of different target prompts in one decode batch (issue 19): caches merged with left padding
and a mask, per-row positions, and unpatched prompts decoded in the same loop. Every continuation
must equal the naive per-patch one, on every architecture, with stops and with EOS."""

from __future__ import annotations

import pytest
import torch

from patchscan.engine import Patch, generate, patching
from patchscan.engine.decoding import Padding, _hf_generate, plain_generate
from patchscan.engine.kv import PreallocatedLayer, merged_cache
from tests.conftest import ARCHS, tiny
from tests.helpers import varied_stops
from tests.reference import naive_generate

NEW = 8
TEXTS = ["The capital city of x is a", "Hello x", "One two three four x five six seven", "a b x"]


def _patches(view) -> list[Patch]:
    """Four prompts of different lengths, patched at the placeholder (last or middle position)."""
    torch.manual_seed(0)
    vectors = torch.randn(3, view.width, dtype=view.dtype)
    patches = []
    for text in TEXTS:
        ids = tuple(view.encode(text))
        position = ids.index(view.encode(" x")[-1]) if not text.startswith("Hello") else len(ids) - 1
        layers = range(0, view.n_blocks)
        patches += [
            Patch(target_ids=ids, target_position=position, target_layer=b, vector=v) for v in vectors for b in layers
        ]
    return patches


def _spy_merges(monkeypatch) -> list:
    calls = []

    def spy(config, caches, room):
        out = merged_cache(config, caches, room)
        calls.append((len(caches), out[1] is not None))
        return out

    monkeypatch.setattr(patching, "merged_cache", spy)
    return calls


@pytest.mark.parametrize("name", ARCHS)
def test_prompts_of_different_lengths_decode_as_one_batch(name, monkeypatch):
    """With and without shared lower blocks (one naive reference for both: it is most of the time)."""
    view = tiny(name)
    patches = _patches(view)
    naive = [naive_generate(view, p, NEW) for p in patches]
    stops, expected = varied_stops(view, naive, 1)
    merges = _spy_merges(monkeypatch)
    for share in (True, False):
        merges.clear()
        merged = generate(view, patches, max_new_tokens=NEW, stops=stops, batch_size=256, share_lower_blocks=share)
        assert merged == expected, share
        assert len({len(t) for t in merged}) > 2, "rows finish at different steps"
        if name == "tiny_gemma3":  # sliding-window cache layers: each prompt decodes on its own
            assert merges == []
        else:
            assert merges == [(len(TEXTS), True)], "one batch of all four prompts, padded"
        # A batch boundary inside a prompt's rows: the prompt's rows split over two merged batches.
        split = generate(view, patches, max_new_tokens=NEW, stops=stops, batch_size=17, share_lower_blocks=share)
        assert split == expected, share


def test_prompts_of_one_length_merge_without_a_mask(monkeypatch):
    view = tiny("tiny_llama")
    ids_a, ids_b = tuple(view.encode("The capital city of x")), tuple(view.encode("The largest river of x"))
    assert len(ids_a) == len(ids_b)
    vector = torch.randn(view.width, dtype=view.dtype)
    patches = [
        Patch(target_ids=i, target_position=-1, target_layer=b, vector=vector) for i in (ids_a, ids_b) for b in range(3)
    ]
    merges = _spy_merges(monkeypatch)
    assert generate(view, patches, max_new_tokens=NEW) == [naive_generate(view, p, NEW) for p in patches]
    assert merges == [(2, False)]


def test_rows_of_different_prompts_never_share_lower_blocks():
    """Two prompts whose rows generate the same tokens: their blocks below ℓ* still differ (other
    prompts), so each prompt's rows keep their own class."""
    view = tiny("tiny_gpt2")
    vector = torch.randn(view.width, dtype=view.dtype)
    top = view.n_blocks - 1
    patches = [
        Patch(target_ids=tuple(view.encode(t)), target_position=-1, target_layer=top, vector=vector)
        for t in ("The capital city of x", "A quite different and longer prompt x")
        for _ in range(3)
    ]
    assert generate(view, patches, max_new_tokens=NEW) == [naive_generate(view, p, NEW) for p in patches]


@pytest.mark.parametrize("name", ARCHS)
def test_unpatched_prompts_decode_in_our_loop_as_hf_generate_does(name):
    view = tiny(name)
    prompts = [tuple(view.encode(t)) for t in TEXTS + ["x"]]
    full = [
        naive_generate(view, Patch(target_ids=p, target_position=-1, target_layer=0, vector=None), NEW) for p in prompts
    ]
    stops, expected = varied_stops(view, full, 1)
    assert plain_generate(view, prompts, NEW, stops) == expected == _hf_generate(view, prompts, NEW, stops)


def test_merged_cache_right_aligns_each_prompt_and_masks_the_padding():
    view = tiny("tiny_llama")
    caches, rows, lengths = [], [2, 3], [5, 3]
    for n, length in zip(rows, lengths):
        ids = torch.randint(0, 50, (n, length))
        caches.append(view.model(input_ids=ids, use_cache=True).past_key_values)
    for cache in caches:  # as a patched prefill leaves them
        for i, layer in enumerate(cache.layers):
            cache.layers[i] = PreallocatedLayer(layer.keys.shape[-2], layer.keys, layer.values)
    merged, mask = merged_cache(view.model.config, caches, room=4)
    assert mask.tolist() == [[1] * 5] * 2 + [[0, 0, 1, 1, 1]] * 3
    for i, layer in enumerate(merged.layers):
        assert layer.get_seq_length() == 5 and layer._keys.shape[-2] == 9
        assert torch.equal(layer.keys[:2], caches[0].layers[i].keys)
        assert torch.equal(layer.keys[2:, :, 2:], caches[1].layers[i].keys)
        assert torch.equal(layer.values[2:, :, 2:], caches[1].layers[i].values)
        assert not layer.keys[2:, :, :2].any() and not layer.values[2:, :, :2].any(), "padding is zero, never nan"
    padding = Padding(mask, torch.device("cpu"))
    assert padding.positions.tolist() == [5, 5, 3, 3, 3]
    padding.advance([0, 2, 4])
    step = padding.step_kwargs()
    assert step["position_ids"].tolist() == [[5], [3], [3]]
    assert step["attention_mask"].tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert padding.positions.tolist() == [6, 4, 4]
