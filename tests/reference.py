"""The naive reference the engine is tested against: one plain Hugging Face forward (or generate
call) per patch, with its own forward hook, as the paper's code does.

It shares no code with `patchscan.engine` (no hooks, no position resolution, no Patch methods, no
family table): only the model, its blocks, the module names written out below and its tokenizer's
ids, so a bug in the engine cannot hide in both.
Tests import it as `tests.reference`; scripts (bench.py) put the repository's tests/ on sys.path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# The HF module of each site below the block output, per model_type, written out by hand:
# (attention, MLP, the norm whose input is the residual between them); None where the family lacks it.
MODULES = {
    **{t: ("self_attn", "mlp", "post_attention_layernorm") for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma3_text": ("self_attn", "mlp", "pre_feedforward_layernorm"),
    "gpt2": ("attn", "mlp", "ln_2"),
    "gptj": ("attn", "mlp", None),  # parallel attention and MLP: no resid_mid
    "gpt_neox": ("attention", "mlp", None),  # the tiny config has use_parallel_residual=True
    "opt": ("self_attn", None, None),  # fc1/fc2 on flattened tokens: only attn_out
}
OUTPUT_SITES = ("resid_post", "attn_out", "mlp_out")  # a module's output; the others are a module's input


def site_module(view, layer: int, site: str):
    """The module whose output (resid_post, attn_out, mlp_out) or input (mlp_in, resid_mid) is `site`."""
    if site == "resid_post":
        return view.blocks[layer]
    attn, mlp, norm = MODULES[view.model.config.model_type]
    name = {"attn_out": attn, "mlp_out": mlp, "mlp_in": mlp, "resid_mid": norm}[site]
    return None if name is None else getattr(view.blocks[layer], name)


def site_hook(site: str, position: int, vector: torch.Tensor | None, store: dict | None = None, first_only=True):
    """(for `register`) a plain hook that reads `site` at `position` into store["h"], or writes
    `vector` there (in the first call only where `first_only`: a patch in generation acts in the prefill)."""
    calls = {"n": 0}

    def output_hook(module, inputs, output):
        calls["n"] += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if store is not None:
            store["h"] = hidden[0, position].clone()
            return None
        if first_only and calls["n"] > 1:
            return None
        hidden = hidden.clone()
        hidden[:, position] = vector.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def input_hook(module, args):
        calls["n"] += 1
        if store is not None:
            store["h"] = args[0][0, position].clone()
            return None
        if first_only and calls["n"] > 1:
            return None
        if site == "resid_mid":  # the residual itself: the block adds the MLP to this very tensor
            args[0][:, position] = vector.to(args[0].device, args[0].dtype)
            return None
        hidden = args[0].clone()
        hidden[:, position] = vector.to(hidden.device, hidden.dtype)
        return (hidden, *args[1:])

    return output_hook if site in OUTPUT_SITES else input_hook


def register(module, site: str, hook):
    if site in OUTPUT_SITES:
        return module.register_forward_hook(hook)
    return module.register_forward_pre_hook(hook)


def _place(patch, view) -> tuple[list[int], int, int]:
    """The patch's target ids, its position and block, resolved here (negative: from the end)."""
    ids = [int(t) for t in patch.target_ids]
    position, layer = int(patch.target_position), int(patch.target_layer)
    if not -len(ids) <= position < len(ids) or not -view.n_blocks <= layer < view.n_blocks:
        raise ValueError(f"position {position} or block {layer} out of range for {len(ids)} tokens")
    return ids, position % len(ids), layer % view.n_blocks


@contextmanager
def _overwrite(view, layer: int, position: int, vector: torch.Tensor | None, prefill_only: bool, site="resid_post"):
    """A plain hook on the module of `site` in block `layer`: row 0's state at `position` becomes
    `vector` (in the first call only where `prefill_only`)."""
    if vector is None:
        yield
        return
    hook = site_hook(site, position, vector, first_only=prefill_only)
    handle = register(site_module(view, layer, site), site, hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def naive_capture(view, ids: list[int], layer: int, position: int, site: str = "resid_post") -> torch.Tensor:
    """The state at `site` of block `layer` at `position` of one plain forward."""
    store: dict = {}
    handle = register(site_module(view, layer, site), site, site_hook(site, position, None, store))
    try:
        view.model(input_ids=torch.tensor([ids], device=view.input_device))
    finally:
        handle.remove()
    return store["h"]


@torch.no_grad()
def naive_logits(view, patch) -> torch.Tensor:
    """Next-token logits at the last position of the full target prompt, patched."""
    ids, position, layer = _place(patch, view)
    x = torch.tensor([ids], device=view.input_device)
    site = getattr(patch, "target_site", "resid_post")
    with _overwrite(view, layer, position, patch.vector, prefill_only=False, site=site):
        return view.model(input_ids=x).logits[0, -1].float().cpu()


@torch.no_grad()
def naive_generate(view, patch, max_new_tokens: int = 20) -> list[int]:
    """Greedy HF generate on the full target prompt with the patch in the prefill pass only."""
    ids, position, layer = _place(patch, view)
    x = torch.tensor([ids], device=view.input_device)
    site = getattr(patch, "target_site", "resid_post")
    with _overwrite(view, layer, position, patch.vector, prefill_only=True, site=site):
        out = view.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=view.tokenizer.pad_token_id,
            eos_token_id=sorted(view.eos_token_ids) or None,
        )
    return out[0, x.shape[1] :].tolist()
