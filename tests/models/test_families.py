"""The family table (models.families): every family it lists has a tiny model in the test matrix,
models are checked against it when they load (as nnterp does), and the engine's fast paths follow
its flags."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import patchscan as ps
from patchscan.models.families import FAMILIES, BlockParts, module_at
from patchscan.models.loading import TINY_CONFIGS
from patchscan.paths import model_config
from tests.conftest import FAMILY_ARCHS, tiny
from tests.helpers import cli_here


def test_every_family_has_a_tiny_model_in_the_matrix():
    assert set(TINY_CONFIGS) == set(FAMILIES)
    assert sorted(model_config(name)["arch"] for name in FAMILY_ARCHS) == sorted(FAMILIES)


def test_every_block_part_the_table_names_is_a_module_of_each_tiny_block():
    for name in FAMILY_ARCHS:
        view = tiny(name)
        for part, path in dataclasses.asdict(view.family.parts).items():
            if path is not None:
                assert all(isinstance(module_at(b, path), torch.nn.Module) for b in view.blocks), (name, part)


def _unsupported_model():
    """A tiny random model of an architecture outside the table (Phi-3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = tiny("tiny_llama")
    shape = TINY_CONFIGS["llama"]  # the tiny Llama's shape, a small vocabulary
    config = AutoConfig.for_model("phi3", **shape, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval(), llama.tokenizer


def test_an_unsupported_model_type_is_refused_in_one_line_naming_the_supported_ones():
    model, tokenizer = _unsupported_model()
    with pytest.raises(ps.UserError) as err:
        ps.ModelView.wrap(model, tokenizer)
    message = str(err.value)
    assert "model_type 'phi3'" in message and "\n" not in message
    assert all(family in message for family in FAMILIES)


def test_the_cli_refuses_an_unsupported_model_folder(tmp_path):
    model, tokenizer = _unsupported_model()
    model.save_pretrained(tmp_path / "phi3")
    tokenizer.save_pretrained(tmp_path / "phi3")
    proc = cli_here("inspect", "--model", str(tmp_path / "phi3"), "--text", "The cat", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()  # refused from its config.json, before the weights are read
    assert line.startswith("patchscan: error: ") and "model_type 'phi3'" in line and "llama" in line
    assert "Traceback" not in proc.stderr and len(line.splitlines()) == 1


def test_a_layout_the_engine_would_get_wrong_is_refused_at_load():
    """An OPT whose embeddings are narrower than its blocks (project_in/out, as OPT-350m): the logit
    lens through the final norm and unembedding alone would be wrong, so it does not load."""
    with pytest.raises(ps.UserError, match="embedding model.decoder.embed_tokens has width 32, its blocks 64"):
        ps.load_model({"source": "tiny", "arch": "opt", "name": "narrow_opt", "config": {"word_embed_proj_dim": 32}})


def test_a_module_the_table_names_but_the_model_lacks_is_refused(monkeypatch):
    wrong = dataclasses.replace(FAMILIES["llama"], parts=BlockParts("self_attn", "mlp", "no_such_norm"))
    monkeypatch.setitem(FAMILIES, "llama", wrong)
    with pytest.raises(ps.UserError, match="tiny_llama .* 'llama' family: a block has no mlp_norm at no_such_norm"):
        ps.load_model("tiny_llama", device="cpu")


def test_the_fast_paths_follow_the_table(monkeypatch):
    """A family whose row turns the fast paths off decodes plainly and reads the model's own logits,
    with the same tokens (the flags are the only switch: no allow-list elsewhere)."""
    from patchscan.engine import Patch, generate
    from patchscan.engine.head import GreedyHead
    from patchscan.engine.kv import preallocated_cache
    from patchscan.engine.sharing import can_share

    view = tiny("tiny_qwen3")
    kv = preallocated_cache(view.model.config, 8)
    assert GreedyHead.for_view(view) is not None and can_share(view, kv)
    ids = tuple(view.encode("The capital of x is"))
    patches = [Patch(target_ids=ids, target_position=3, target_layer=k, vector=torch.ones(view.width)) for k in (0, 2)]
    fast = generate(view, patches, max_new_tokens=5)
    off = dataclasses.replace(view.family, padded_decoding=False, shared_decoding=False, greedy_head=False)
    monkeypatch.setattr(view, "family", off)
    assert GreedyHead.for_view(view) is None and not can_share(view, kv)
    assert generate(view, patches, max_new_tokens=5) == fast
