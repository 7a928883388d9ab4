"""Models split over devices (issue 12, point 1): a model that accelerate dispatched, with some
blocks offloaded to disk, gives the same states, rows and generations as the plain model, and no
engine call leaves any model changed (forwards, hooks, block lists, config), even when it raises.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from patchscan.engine import Patch, capture, generate, patched_logits
from patchscan.engine.hooks import block_hooks, patch_hook, skip_blocks
from patchscan.models import load_model
from patchscan.models.view import execution_device
from tests.conftest import tiny
from tests.helpers import IDENTITY, SOURCES, grid_patches, run_in

_OFFLOADED: dict = {}


def split_map(view) -> dict[str, str]:
    """A device_map for a loaded model that keeps every other block (and the final norm) on disk."""
    names = {id(m): n for n, m in view.model.named_modules()}
    blocks = names[id(view.blocks)]
    norm = names.get(id(view.final_norm))
    device_map = {}
    for name, _ in list(view.model.named_parameters()) + list(view.model.named_buffers()):
        module = name.rpartition(".")[0]
        if module.startswith(blocks + "."):
            index = int(module[len(blocks) + 1 :].split(".")[0])
            device_map[f"{blocks}.{index}"] = "disk" if index % 2 else "cpu"
        else:
            device_map[module] = "disk" if module == norm else "cpu"
    return device_map


def offloaded(name: str, tmp_path_factory):
    """The model `name` dispatched by accelerate with blocks on disk (AlignDevicesHook on each)."""
    if name not in _OFFLOADED:
        folder = tmp_path_factory.mktemp(f"offload-{name}")
        if name == "smollm2_135m":  # blocks 24-29 and the final norm on disk (300MiB: 13-29, slower; the CLI test)
            cfg = {
                "source": "builtin",
                "name": name,
                "device_map": "auto",
                "max_memory": {"cpu": "450MiB"},
                "offload_folder": str(folder),
            }
        else:
            arch = {"tiny_llama": "llama", "tiny_neox": "gpt_neox"}[name]
            cfg = {
                "source": "tiny",
                "arch": arch,
                "name": name,
                "device_map": split_map(tiny(name)),
                "offload_folder": str(folder),
            }
        _OFFLOADED[name] = load_model(cfg)
    return _OFFLOADED[name]


def model_state(model) -> dict:
    """Everything an engine call could leave behind on a model, compared by identity."""
    modules = {
        name: (
            module.__dict__.get("forward"),
            getattr(module, "_hf_hook", None),
            tuple(module._modules.items()),
            tuple(module._forward_hooks.items()),
            tuple(module._forward_pre_hooks.items()),
            tuple(module._forward_hooks_with_kwargs.items()),
            tuple(module._forward_pre_hooks_with_kwargs.items()),
            module.training,
        )
        for name, module in model.named_modules()
    }
    return {
        "modules": modules,
        "config": model.config.to_dict(),
        "generation": model.generation_config.to_dict(),
        "params": {n: p.device for n, p in model.named_parameters()},
    }


def disk_blocks(view) -> list[int]:
    return [
        i
        for i, b in enumerate(view.blocks)
        if b.__dict__.get("forward") is not None and any(p.device.type == "meta" for p in b.parameters())
    ]


def _grid(view) -> list[Patch]:
    """Patches of the engine tests on a tiny model; on the built-in (whose offloaded forwards are slow)
    one of each kind: last target position (block skipping) below and on the disk blocks, a middle
    position (prefix cache) and position 0."""
    if view.n_blocks <= 4:
        return grid_patches(view)[::2]
    cap = capture(view, [view.encode(SOURCES[0])], [2, 27], [[-1]])[0]
    target, other = tuple(view.encode(IDENTITY)), tuple(view.encode("The capital city of x"))
    return [
        Patch(target_ids=target, target_position=-1, target_layer=2, vector=cap.states[0, 0]),
        Patch(target_ids=target, target_position=-1, target_layer=27, vector=cap.states[1, 0]),
        Patch(target_ids=other, target_position=2, target_layer=27, vector=cap.states[0, 0]),
        Patch(target_ids=other, target_position=0, target_layer=2, vector=cap.states[1, 0]),
    ]


def _everything(view):
    """Capture (states, p_L), patched next-token logits and generations, patched and unpatched."""
    small = view.n_blocks > 4
    prompts = [view.encode(s) for s in SOURCES][: 1 if small else None]
    positions = [[0, -1], [0], [1, 2, -1]][: len(prompts)]
    caps = capture(view, prompts, list(range(view.n_blocks)), positions, with_logprobs=True)
    patches = _grid(view)
    logits = patched_logits(view, patches, batch_size=7)
    chosen = (patches if small else patches[:: len(patches) // 8]) + [
        Patch(target_ids=tuple(p), target_position=len(p) - 1, target_layer=0, vector=None) for p in prompts
    ]
    gens = generate(view, chosen, max_new_tokens=4 if small else 6, batch_size=4)
    return caps, logits, gens


@pytest.mark.parametrize("name", ["smollm2_135m", "tiny_llama", "tiny_neox"])
def test_offloaded_model_equals_plain_model(name, tmp_path_factory, request):
    view = offloaded(name, tmp_path_factory)
    ref = request.getfixturevalue("builtin_view") if name == "smollm2_135m" else tiny(name)
    assert len(disk_blocks(view)) >= 2, "the test needs blocks that accelerate loads from disk"
    assert execution_device(view.final_norm) == torch.device("cpu")
    before = model_state(view.model)
    caps, logits, gens = _everything(view)
    ref_caps, ref_logits, ref_gens = _everything(ref)
    for a, b in zip(caps, ref_caps):
        assert torch.equal(a.states, b.states) and torch.equal(a.logprobs, b.logprobs)
    # rows and generations are identical; logits of multi-token batches may differ in float rounding (~1e-6)
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1)) and torch.allclose(logits, ref_logits, atol=1e-5)
    assert gens == ref_gens
    assert model_state(view.model) == before
    # after all those calls (block skipping among them) the dispatched model is still the plain model
    ids = torch.tensor([view.encode(SOURCES[0])])
    assert torch.equal(view.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)


def test_skip_blocks_keeps_accelerate_wrappers(tmp_path_factory):
    view = offloaded("tiny_llama", tmp_path_factory)
    before, blocks = model_state(view.model), list(view.blocks)
    with skip_blocks(view.blocks, 2, view.block_returns_tuple):
        assert all(a is not b for a, b in zip(view.blocks[:3], blocks))
    assert model_state(view.model) == before and list(view.blocks) == blocks
    with pytest.raises(ZeroDivisionError):
        with skip_blocks(view.blocks, 3, view.block_returns_tuple):
            raise ZeroDivisionError
    assert model_state(view.model) == before and list(view.blocks) == blocks


def test_hooks_of_a_skipped_block_still_fire():
    view = tiny("tiny_llama")
    seen = []
    vec = torch.ones(1, view.width)
    hooks = {0: lambda m, i, o: seen.append(0), 1: patch_hook(torch.tensor([0]), torch.tensor([0]), vec)}
    with block_hooks(view.blocks, hooks), skip_blocks(view.blocks, 1, view.block_returns_tuple):
        out = capture(view, [[5]], [1], [[0]])[0]
    assert seen == [0] and torch.equal(out.states[0, 0], vec[0])


@pytest.mark.parametrize("name", ["tiny_llama", "plain-tiny_llama"])
def test_a_failing_call_leaves_the_model_as_it_was(name, tmp_path_factory):
    view = tiny("tiny_llama") if name.startswith("plain") else offloaded("tiny_llama", tmp_path_factory)
    before = model_state(view.model)
    target = tuple(view.encode(IDENTITY))
    bad = torch.zeros(view.width + 1)  # a vector of the wrong width fails inside the patch hook
    for call in (
        lambda: patched_logits(view, [Patch(target_ids=target, target_position=-1, target_layer=2, vector=bad)]),
        lambda: patched_logits(view, [Patch(target_ids=target, target_position=3, target_layer=1, vector=bad)]),
        lambda: generate(
            view, [Patch(target_ids=target, target_position=-1, target_layer=1, vector=bad)], max_new_tokens=3
        ),
    ):
        with pytest.raises(RuntimeError):
            call()
        assert model_state(view.model) == before


def test_offloaded_next_token_run_writes_the_same_rows(tmp_path):
    """The whole next_token experiment on the built-in model: offloaded rows equal plain rows."""
    args = [
        "experiment=next_token",
        "model=smollm2_135m",
        "dataset.limit=3",
        "methods=[token_identity,logit_lens]",
        "sweep.source_layers=0:30:3",
    ]
    run_in(tmp_path / "plain", *args)
    run_in(
        tmp_path / "split",
        *args,
        "model.device_map=auto",
        "model.max_memory={cpu: 300MiB}",
        f"model.offload_folder={tmp_path / 'offload'}",
    )
    key = ["example_id", "method", "source_layer", "target_layer"]
    a = pd.read_parquet(tmp_path / "plain" / "results").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "split" / "results").sort_values(key).reset_index(drop=True)
    assert len(a) == 3 * 10 * 2
    pd.testing.assert_frame_equal(a, b)


def test_placement_options_need_a_device_map():
    from patchscan.errors import UserError

    with pytest.raises(UserError, match="device_map"):
        load_model({"source": "tiny", "arch": "llama", "max_memory": {"cpu": "1GiB"}})
