"""Source states: one forward returns the outputs of all requested blocks at all requested
positions, for a batch of prompts of different lengths (right padding keeps positions exact)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchscan import grids
from patchscan.engine.hooks import block_hooks, hidden_of, site_hooks
from patchscan.models.view import ModelView


def resolve_position(position: int, length: int, what: str = "position") -> int:
    """An index into the unpadded sequence; negative counts from the end (the grammar of `grids`)."""
    return grids.position(position, length, what)


def pad_batch(prompts: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) for prompts of different lengths, padded on the right or left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, ids in enumerate(prompts):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[b, cols] = torch.tensor(ids, dtype=torch.long)
        mask[b, cols] = 1
    return input_ids, mask


@dataclass
class Captured:
    """States of one prompt: states[k, j] is block layers[k]'s output at positions[j]."""

    layers: list[int]
    positions: list[int]
    states: torch.Tensor  # (n_layers, n_positions, width)
    logprobs: torch.Tensor | None  # (n_positions, vocab): the model's own next-token log-probs

    def at(self, layer: int, j: int = 0) -> torch.Tensor:
        """The output of block `layer` at the j-th captured position."""
        return self.states[self.layers.index(layer), j]


@torch.no_grad()
def next_token_logprobs(view: ModelView, hidden: torch.Tensor, chunk_mb: int = 256) -> torch.Tensor:
    """Log-softmax of the read-out of last-block states (rows, width) -> (rows, vocab), float32.

    Filled in row chunks of about `chunk_mb` of logits, so a large vocabulary (Gemma 3's 262,144
    tokens: 1 MB a row) costs the result plus one chunk, not three full-size temporaries.
    """
    out = torch.empty((hidden.shape[0], view.vocab_size), device=view.device)
    step = max(1, chunk_mb * 2**20 // (4 * view.vocab_size))
    for s in range(0, hidden.shape[0], step):
        out[s : s + step] = torch.log_softmax(view.readout(hidden[s : s + step]), dim=-1)
    return out


@torch.no_grad()
def capture(
    view: ModelView,
    prompts: list[list[int]],
    layers: list[int],
    positions: list[list[int]],
    batch_size: int = 32,
    with_logprobs: bool = False,
    backend=None,
    site: str = "resid_post",
) -> list[Captured]:
    """Run each prompt once and gather block outputs (or another `site` of the blocks, see
    models.families.SITES) at the given positions.

    `positions[p]` lists positions of prompt p (negative ones count from its end). With
    `with_logprobs`, also return the model's next-token log-probabilities there (p_L of DESIGN §2),
    read out from the last block's output so no full-vocabulary logits are made for other positions.
    Each batch runs through `backend.capture` (`engine.patching.Backend`; the dry run's counts it),
    by default `capture_batch`.
    """
    layers = grids.blocks(layers, view.n_blocks, "layers", view.name, distinct=False)  # internal: repeats are harmless
    view.site(site)  # an unknown site, or one the family lacks, is refused here in one line
    want = sorted(set(layers) | ({view.n_blocks - 1} if with_logprobs else set()))
    run = capture_batch if backend is None else backend.capture
    results: list[Captured] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        pos = [
            [resolve_position(p, len(ids), "source position") for p in positions[start + b]]
            for b, ids in enumerate(batch)
        ]
        stacked, logprobs = run(view, batch, pos, layers, want, with_logprobs, site)
        offset = 0
        for ps in pos:
            sl = slice(offset, offset + len(ps))
            results.append(Captured(layers, ps, stacked[:, sl], None if logprobs is None else logprobs[sl]))
            offset += len(ps)
    return results


@torch.no_grad()
def capture_batch(
    view: ModelView,
    batch: list[list[int]],
    pos: list[list[int]],
    layers: list[int],
    want: list[int],
    with_logprobs,
    site: str = "resid_post",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of a right-padded batch: (states (n_layers, n_rows, width), log-probs or None),
    rows prompt by prompt and position by position. `want` are the blocks whose output is read
    (the captured ones, and the last for p_L); at another site the captured blocks are read there
    and only the last block's output is read for p_L."""
    point = view.site(site)
    input_ids, mask = pad_batch(batch, view.tokenizer.pad_token_id or 0)
    rows = torch.tensor([b for b, ps in enumerate(pos) for _ in ps], device=view.input_device)
    cols = torch.tensor([p for ps in pos for p in ps], device=view.input_device)
    store: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = store if point is None else {}  # block outputs (for p_L)

    def make_hook(layer, into):
        def hook(module, inputs, output):  # indices to the block's device, states to the output device
            hidden = hidden_of(output)
            into[layer] = hidden[rows.to(hidden.device), cols.to(hidden.device)].to(view.device)

        return hook

    at_blocks = {layer: make_hook(layer, store) for layer in want}
    at_site = {}
    if point is not None:
        last = [view.n_blocks - 1] if with_logprobs else []
        at_site, at_blocks = (
            {layer: make_hook(layer, store) for layer in layers},
            {b: make_hook(b, outputs) for b in last},
        )
    with block_hooks(view.blocks, at_blocks), site_hooks(view.blocks, point, at_site):
        # The base model (no LM head) avoids full-vocabulary logits at every position.
        base = getattr(view.model, "base_model", view.model)
        base(input_ids=input_ids.to(view.input_device), attention_mask=mask.to(view.input_device), use_cache=False)
    stacked = torch.stack([store[layer] for layer in layers])  # (n_layers, n_rows, width)
    logprobs = next_token_logprobs(view, outputs[view.n_blocks - 1]) if with_logprobs else None
    return stacked, logprobs
