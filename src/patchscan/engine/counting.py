"""Count the model work a block of code does: forward passes, tokens run, tokens generated.

    with count_work(view.model) as counts:
        rows = scope.run_chunk(chunk, progress)
    counts.forward_passes, counts.tokens_generated

One forward pre-hook on the model's base (the decoder stack without the LM head), which every
call goes through: the engine's prefills and decode steps, its prefix caches, captures, and
Hugging Face `generate` (prefill and each decode step). The hook removes exactly the handle it
registered. Generated tokens are reported by the engine (`note_generated`) to every counter
open at the time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_OPEN: list[Counts] = []


@dataclass
class Counts:
    """Model work: forward calls, token positions they ran (rows x new positions), tokens generated."""

    forward_passes: int = 0
    forward_tokens: int = 0
    tokens_generated: int = 0

    def add(self, other: Counts) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _positions(args, kwargs) -> int:
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return int(ids.shape[0] * ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0


@contextmanager
def count_work(*models: nn.Module | None) -> Iterator[Counts]:
    """Count forward passes of `models` (each through its base model; None is skipped, a model given
    twice counts once: cross_model's source and target) while the block runs."""
    counts = Counts()
    handles = []

    def hook(module, args, kwargs):
        counts.forward_passes += 1
        counts.forward_tokens += _positions(args, kwargs)

    bases = {id(b): b for b in (getattr(m, "base_model", m) for m in models if m is not None)}
    for base in bases.values():
        handles.append(base.register_forward_pre_hook(hook, with_kwargs=True))
    _OPEN.append(counts)
    try:
        yield counts
    finally:
        _OPEN.remove(counts)
        for handle in handles:
            handle.remove()


def note_generated(n_tokens: int) -> None:
    """Called by the engine with the tokens it generated; adds them to every open counter."""
    for counts in _OPEN:
        counts.tokens_generated += n_tokens
