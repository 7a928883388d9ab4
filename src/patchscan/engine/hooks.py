"""The only place that touches module hooks.

Blocks return a bare tensor or a tuple whose first item is the hidden state, depending on the
model and the transformers version; `hidden_of` and `with_hidden` handle both. One hook is
registered per block, never one per batch row.

Sites other than a block's output (issue 28; models.families.SitePoint) hook a sub-module of each
block instead: `site_hooks` registers the same `fn(module, inputs, output)` functions there, as a
forward hook on the module (kind "output") or as a pre-hook that hands them the module's first
input as `output` (kinds "input" and "stream"): every function here works on any site unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from patchscan.models.view import HOOK_DICTS


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


@contextmanager
def site_hooks(blocks: nn.ModuleList, site, hooks: dict[int, Callable]) -> Iterator[None]:
    """`block_hooks` at a site of each block (a models.families.SitePoint; None: the block's output).

    For an input site the function's return value replaces the module's first input; for a stream
    site (the residual the block goes on adding to) it is copied into that very tensor, so the
    block's own sum sees it as well as the module."""
    if site is None:
        with block_hooks(blocks, hooks):
            yield
        return
    from patchscan.models.families import module_at

    handles = []
    try:
        for i, fn in hooks.items():
            module = module_at(blocks[i], site.path)
            if site.kind == "output":
                handles.append(module.register_forward_hook(fn))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(fn, site.kind == "stream")))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(fn: Callable, in_place: bool) -> Callable:
    def pre_hook(module, args):
        if not args:
            raise RuntimeError(f"{type(module).__name__} was called without a positional input to hook")
        new = fn(module, args, args[0])
        if new is None or new is args[0]:
            return None
        if in_place:
            args[0].copy_(new)
            return None
        return (new,) + tuple(args[1:])

    return pre_hook


def patch_hook(rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> Callable:
    """A hook that overwrites the block output at (rows[k], positions[k]) with vectors[k].

    Indices and vectors go to the device of the hidden state they index, which for a model split
    over devices (`device_map`) is the device of this block, not of the model's input or output.
    """

    def hook(module, inputs, output):
        return overwritten(output, rows, positions, vectors)

    return hook


def overwritten(output, rows, positions, vectors: torch.Tensor):
    """`output` (a module's output, tuple or tensor) with its hidden state overwritten at (rows,
    positions) by `vectors`: the one overwrite of every patching hook (the engine's and ps.overwrite).
    `rows` may be a slice (every row); indices and vectors go to the hidden state's device."""
    hidden = hidden_of(output).clone()
    dev = hidden.device
    index = tuple(i.to(dev) if isinstance(i, torch.Tensor) else i for i in (rows, positions))
    hidden[index] = vectors.to(dev, hidden.dtype)
    return with_hidden(output, hidden)


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


class _Passthrough(nn.Module):
    """Stands in for a skipped block: returns its input hidden state untouched.

    It shares the real block's hook dictionaries, so forward hooks registered on the block (before
    or during the skip) still fire, and reads any other attribute (`attention_type`, ...) from it.
    """

    def __init__(self, block: nn.Module, returns_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: parameters stay the block's
        self.returns_tuple = returns_tuple
        for name in HOOK_DICTS:
            object.__setattr__(self, name, getattr(block, name))

    def forward(self, hidden_states=None, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextmanager
def skip_blocks(blocks: nn.ModuleList, upto: int, returns_tuple: bool) -> Iterator[None]:
    """Make blocks 0..upto pass their input through untouched (their forward hooks still fire).

    Used when a row is patched at block `upto` at its last position and nothing follows it:
    the work of those blocks at that position would be overwritten, so it is skipped. The blocks
    themselves are never modified: stand-ins take their places in `blocks` for the duration and
    the very same block objects are put back afterwards, so wrappers that accelerate installs on
    a dispatched or offloaded block (its instance `forward`, `_hf_hook`) stay as they were.
    """
    originals = [blocks[i] for i in range(upto + 1)]
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Passthrough(block, returns_tuple)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
