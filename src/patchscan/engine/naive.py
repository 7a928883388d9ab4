"""The naive method: one HF forward (or generate call) per patch, its own hook per patch.

This is how the paper's code works. It is the reference the fast engine is tested against and
the baseline `scripts/bench.py` measures ratios against; it is deliberately plain.
"""

from __future__ import annotations

import torch

from patchscan.engine.hooks import block_hooks, patch_hook
from patchscan.engine.patching import Patch
from patchscan.models.view import ModelView


def _one_hook(patch: Patch, prefill_only: bool):
    inner = patch_hook(torch.tensor([0]), torch.tensor([patch.target_position]), patch.vector[None])
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if prefill_only and calls["n"] > 1:
            return output
        return inner(module, inputs, output)

    return hook


@torch.no_grad()
def naive_logits(view: ModelView, patch: Patch) -> torch.Tensor:
    """Next-token logits at the last position of the full target prompt, patched."""
    patch = patch.resolved(view)
    ids = torch.tensor([patch.target_ids], device=view.input_device)
    with block_hooks(view.blocks, {patch.target_layer: _one_hook(patch, prefill_only=False)}):
        return view.model(input_ids=ids).logits[0, -1].float().cpu()


@torch.no_grad()
def naive_generate(view: ModelView, patch: Patch, max_new_tokens: int = 20) -> list[int]:
    """Greedy HF generate on the full target prompt with the patch in the prefill pass only."""
    patch = patch.resolved(view)
    ids = torch.tensor([patch.target_ids], device=view.input_device)
    hooks = {} if patch.vector is None else {patch.target_layer: _one_hook(patch, prefill_only=True)}
    with block_hooks(view.blocks, hooks):
        out = view.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=view.tokenizer.pad_token_id,
            eos_token_id=sorted(view.eos_token_ids) or None,
        )
    return out[0, ids.shape[1] :].tolist()
