"""The naive reference the engine is tested against: one plain Hugging Face forward (or generate
call) per patch, with its own forward hook, as the paper's code does.

It shares no code with `patchscan.engine` (no hooks, no position resolution, no Patch methods):
only the model, its blocks and its tokenizer's ids, so a bug in the engine cannot hide in both.
Tests import it as `tests.reference`; scripts (bench.py) put the repository's tests/ on sys.path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _place(patch, view) -> tuple[list[int], int, int]:
    """The patch's target ids, its position and block, resolved here (negative: from the end)."""
    ids = [int(t) for t in patch.target_ids]
    position, layer = int(patch.target_position), int(patch.target_layer)
    if not -len(ids) <= position < len(ids) or not -view.n_blocks <= layer < view.n_blocks:
        raise ValueError(f"position {position} or block {layer} out of range for {len(ids)} tokens")
    return ids, position % len(ids), layer % view.n_blocks


@contextmanager
def _overwrite(view, layer: int, position: int, vector: torch.Tensor | None, prefill_only: bool):
    """A plain forward hook on block `layer`: row 0's state at `position` becomes `vector` (in the
    first call only where `prefill_only`, as a patch in generation acts in the prefill)."""
    if vector is None:
        yield
        return
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if prefill_only and calls[0] > 1:
            return output
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, position] = vector.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = view.blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def naive_logits(view, patch) -> torch.Tensor:
    """Next-token logits at the last position of the full target prompt, patched."""
    ids, position, layer = _place(patch, view)
    x = torch.tensor([ids], device=view.input_device)
    with _overwrite(view, layer, position, patch.vector, prefill_only=False):
        return view.model(input_ids=x).logits[0, -1].float().cpu()


@torch.no_grad()
def naive_generate(view, patch, max_new_tokens: int = 20) -> list[int]:
    """Greedy HF generate on the full target prompt with the patch in the prefill pass only."""
    ids, position, layer = _place(patch, view)
    x = torch.tensor([ids], device=view.input_device)
    with _overwrite(view, layer, position, patch.vector, prefill_only=True):
        out = view.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=view.tokenizer.pad_token_id,
            eos_token_id=sorted(view.eos_token_ids) or None,
        )
    return out[0, x.shape[1] :].tolist()
