"""The only place that touches module hooks.

Blocks return a bare tensor or a tuple whose first item is the hidden state, depending on the
model and the transformers version; `hidden_of` and `with_hidden` handle both. One hook is
registered per block, never one per batch row.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def block_hooks(blocks: nn.ModuleList, hooks: dict[int, Callable]) -> Iterator[None]:
    """Register forward hooks `{block index: fn(module, inputs, output)}` for the duration."""
    handles = [blocks[i].register_forward_hook(fn) for i, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def patch_hook(rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> Callable:
    """A hook that overwrites the block output at (rows[k], positions[k]) with vectors[k]."""

    def hook(module, inputs, output):
        hidden = hidden_of(output).clone()
        hidden[rows, positions] = vectors.to(hidden.dtype)
        return with_hidden(output, hidden)

    return hook


def grouped_patch_hooks(layers, rows, positions, vectors) -> dict[int, Callable]:
    """One patch hook per distinct block, each writing its own rows by index."""
    layers = torch.as_tensor(layers)
    rows = torch.as_tensor(rows)
    positions = torch.as_tensor(positions)
    hooks = {}
    for layer in layers.unique().tolist():
        sel = (layers == layer).nonzero().flatten()
        dev = vectors.device
        hooks[layer] = patch_hook(rows[sel].to(dev), positions[sel].to(dev), vectors[sel.to(dev)])
    return hooks


@contextmanager
def skip_blocks(blocks: nn.ModuleList, upto: int, returns_tuple: bool) -> Iterator[None]:
    """Make blocks 0..upto pass their input through untouched (their hooks still fire).

    Used when a row is patched at block `upto` at its last position and nothing follows it:
    the work of those blocks at that position would be overwritten, so it is skipped.
    """

    def passthrough(hidden_states, *args, **kwargs):
        return (hidden_states,) if returns_tuple else hidden_states

    for block in blocks[: upto + 1]:
        block.forward = passthrough
    try:
        yield
    finally:
        for block in blocks[: upto + 1]:
            del block.forward
