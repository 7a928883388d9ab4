"""Share what rows share in decoding: blocks 0..ℓ* run once per continuation (DESIGN §4, issue 19).

A patch overwrites the output of block ℓ* in the prefill only, so the rows of one target prompt
have the same KV caches in blocks 0..ℓ*, and rows that have generated the same tokens so far
compute the same outputs there. At each decode step block b runs on one representative row per
class of rows that share it (rows with b ≤ ℓ* and the same continuation; a row with b > ℓ* is a
class of its own), and its output is copied back to every row of the class. Layer b's KV cache
holds one row per class; classes only split (continuations diverge) or lose rows (rows finish),
so after each step every layer's cache is re-indexed from the classes it had.

The blocks are never modified: stand-ins take their places in the block list while decoding and
the very same block objects are put back (as `hooks.skip_blocks` does), so accelerate's wrappers
on offloaded blocks stay as they were. Families whose decode step was checked (how the mask
and position embeddings reach each block) say so in the family table (models.families,
`shared_decoding`); others take the plain path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from patchscan.engine.hooks import hidden_of, with_hidden
from patchscan.engine.kv import PreallocatedLayer

_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, PreallocatedLayer)
BLOCK_ROWS = {"run": 0, "plain": 0}  # decode block work of every shared decoding so far (for the bench)


def can_share(view, kv) -> bool:
    """Is sharing exact here: a checked architecture and cache layers that re-index by row?"""
    layers = getattr(kv, "layers", None)
    return (
        view.family.shared_decoding
        and layers is not None
        and len(layers) == view.n_blocks
        and all(type(layer) in _LAYERS for layer in layers)
    )


def _take(value, index: torch.Tensor, n: int):
    """The representative rows of a block argument: tensors with one row per batch row are sliced."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.shape[0] == n:
            return value.index_select(0, index.to(value.device))
        if value.shape[0] != 1:
            raise RuntimeError(f"shared decoding: a block argument of {value.shape[0]} rows in a batch of {n}")
        return value
    if isinstance(value, tuple | list):
        return type(value)(_take(v, index, n) for v in value)
    return value


class _SharedBlock(nn.Module):
    """Stands in for block b while decoding: runs it on one row per class, copies the output back.

    The real block is called as a module, so its own hooks (and accelerate's) run as usual, on the
    representative rows."""

    def __init__(self, block: nn.Module, plan: SharedDecoding, index: int):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: parameters stay the block's
        object.__setattr__(self, "_plan", plan)
        self.index = index

    def forward(self, *args, **kwargs):
        block, plan = object.__getattribute__(self, "_block"), object.__getattribute__(self, "_plan")
        n, shared = plan.n, plan.reps[self.index] is not None
        BLOCK_ROWS["run"] += len(plan.reps[self.index]) if shared else n
        BLOCK_ROWS["plain"] += n
        if not shared:  # every row is a class of its own
            return block(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        reps, rows = plan.indices(self.index, hidden.device)
        args = tuple(_take(a, reps, n) for a in args)
        kwargs = {k: _take(v, reps, n) for k, v in kwargs.items()}
        out = block(*args, **kwargs)
        hidden = hidden_of(out)
        return with_hidden(out, hidden.index_select(0, rows.to(hidden.device)))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def _classes(keys: list) -> tuple[list[int], list[int]]:
    """(first row of each class, class of each row), classes in order of first appearance."""
    ids: dict = {}
    rows = [ids.setdefault(k, len(ids)) for k in keys]
    reps = [0] * len(ids)
    for r in range(len(rows) - 1, -1, -1):
        reps[rows[r]] = r
    return reps, rows


class SharedDecoding:
    """The classes of each block for the rows still decoding, and their KV cache rows.

    `advance(keep, tokens)` is called after each step with the batch positions of the rows that go
    on and their new tokens; it splits the classes and re-indexes every layer's cache (finished
    rows leave it there too)."""

    def __init__(self, blocks: nn.ModuleList, kv, target_layers: Sequence[int], prompts: Sequence[int] | None = None):
        self.blocks, self.kv = blocks, kv
        self.layers = list(target_layers)
        self.n = len(self.layers)
        # An id per distinct (target prompt, continuation); rows of one prompt start on one path.
        self.paths = list(prompts) if prompts is not None else [0] * self.n
        self.reps: list[torch.Tensor | None] = [None] * len(blocks)
        self.rows: list[torch.Tensor | None] = [None] * len(blocks)
        self._on_device: dict = {}  # (block, device) -> (reps, rows) there: one copy per step, not per use
        self._cache_rows: list[list[int] | None] = [None] * len(blocks)  # row -> its cache row (None: itself)

    def advance(self, keep: list[int], tokens: list[int]) -> None:
        ids: dict = {}
        before = self.n
        self._on_device.clear()
        self.paths = [ids.setdefault((self.paths[k], t), len(ids)) for k, t in zip(keep, tokens)]
        self.layers = [self.layers[k] for k in keep]
        self.n = len(keep)
        for b, layer in enumerate(self.kv.layers):
            keys = [p if b <= lay else -1 - r for r, (p, lay) in enumerate(zip(self.paths, self.layers))]
            reps, rows = _classes(keys)
            old = self._cache_rows[b]
            source = [keep[r] if old is None else old[keep[r]] for r in reps]
            if source != list(range(before if old is None else max(old) + 1)):
                layer.batch_select_indices(torch.tensor(source))
            shared = len(reps) < self.n
            self._cache_rows[b] = rows if shared else None
            self.reps[b] = torch.tensor(reps) if shared else None
            self.rows[b] = torch.tensor(rows) if shared else None

    def indices(self, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (block, device)
        if key not in self._on_device:
            self._on_device[key] = (self.reps[block].to(device), self.rows[block].to(device))
        return self._on_device[key]

    @contextmanager
    def installed(self) -> Iterator[SharedDecoding]:
        """Stand-ins in the block list for the duration; the same block objects put back after."""
        originals = list(self.blocks)
        try:
            for b, block in enumerate(originals):
                self.blocks[b] = _SharedBlock(block, self, b)
            yield self
        finally:
            for b, block in enumerate(originals):
                self.blocks[b] = block
