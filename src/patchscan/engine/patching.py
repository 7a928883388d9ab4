"""Many patched runs per forward, with the target prefix computed once (DESIGN §4).

A Patch overwrites the output of block `layer` at token `position` of `target_ids` with
`vector`. Patches that share target tokens and position form a group: the tokens before the
position run once and their KV cache serves every row of the group; each micro-batch runs only
the suffix (usually one token). For next-token read-outs of a one-token suffix, the blocks up
to the patched one are skipped, since their work at that position would be overwritten.
Generation continues greedily from the patched prefill; the patch is applied there only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from patchscan.engine.hooks import block_hooks, grouped_patch_hooks, skip_blocks
from patchscan.engine.capture import resolve_position
from patchscan.models.view import ModelView


@dataclass
class Patch:
    target_ids: tuple[int, ...]
    position: int
    layer: int
    vector: torch.Tensor

    def resolved(self, view: ModelView) -> "Patch":
        ids = tuple(int(t) for t in self.target_ids)
        return Patch(ids, resolve_position(self.position, len(ids), "target position"),
                     view.check_layer(self.layer, "target layer"), self.vector)


class PrefixCache:
    """KV caches of target prefixes, computed once and kept for the groups that share them."""

    def __init__(self, view: ModelView, capacity: int = 8):
        self.view, self.capacity = view, capacity
        self._store: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    @torch.no_grad()
    def get(self, prefix: tuple[int, ...]):
        if not prefix:
            return None
        if prefix in self._store:
            self._store.move_to_end(prefix)
            return self._store[prefix]
        ids = torch.tensor([prefix], device=self.view.device)
        base = getattr(self.view.model, "base_model", self.view.model)
        kv = [(layer.keys, layer.values) for layer in base(input_ids=ids, use_cache=True).past_key_values.layers]
        if self.capacity > 0:
            self._store[prefix] = kv
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)
        return kv

    def expanded(self, prefix: tuple[int, ...], batch: int):
        """A fresh cache object holding the prefix for `batch` rows (the model extends it in place)."""
        from transformers import DynamicCache

        kv = self.get(prefix)
        if kv is None:
            return None
        data = [(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in kv]
        return DynamicCache(data, config=self.view.model.config)


def _groups(view: ModelView, patches: list[Patch]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(patches):
        groups.setdefault((p.target_ids, p.position), []).append(i)
    return groups


def _micro_batches(indices: list[int], patches: list[Patch], batch_size: int, by_layer: bool) -> Iterator[list[int]]:
    if by_layer:  # one block to start from per micro-batch, so skipping applies to all its rows
        layers: dict[int, list[int]] = {}
        for i in indices:
            layers.setdefault(patches[i].layer, []).append(i)
        for layer in sorted(layers):
            rows = layers[layer]
            for s in range(0, len(rows), batch_size):
                yield rows[s:s + batch_size]
    else:
        for s in range(0, len(indices), batch_size):
            yield indices[s:s + batch_size]


@torch.no_grad()
def _prefill(view: ModelView, cache: PrefixCache, patches: list[Patch], rows: list[int], skip: bool, use_cache: bool):
    """Run the suffix of one group for `rows`, patched; return (last-position logits, kv cache)."""
    first = patches[rows[0]]
    suffix = first.target_ids[first.position:]
    n = len(rows)
    input_ids = torch.tensor([suffix] * n, device=view.device)
    vectors = torch.stack([patches[i].vector for i in rows]).to(view.device)
    layers = [patches[i].layer for i in rows]
    hooks = grouped_patch_hooks(layers, list(range(n)), [0] * n, vectors)
    kv = cache.expanded(first.target_ids[: first.position], n)
    kwargs = dict(input_ids=input_ids, past_key_values=kv, use_cache=use_cache, logits_to_keep=1)
    with block_hooks(view.blocks, hooks):
        if skip:
            with skip_blocks(view.blocks, layers[0], view.block_returns_tuple):
                out = view.model(**kwargs)
        else:
            out = view.model(**kwargs)
    return out.logits[:, -1].float(), out.past_key_values


def iter_patched_logits(view: ModelView, patches: list[Patch], batch_size: int = 64, reuse_prefix: bool = True,
                        skip_blocks_below: bool = True, progress: Callable[[int], None] | None = None
                        ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (patch indices, last-position logits) micro-batch by micro-batch."""
    patches = [p.resolved(view) for p in patches]
    cache = PrefixCache(view, capacity=8 if reuse_prefix else 0)
    for (ids, position), indices in _groups(view, patches).items():
        skip = skip_blocks_below and position == len(ids) - 1
        for rows in _micro_batches(indices, patches, batch_size, by_layer=skip):
            logits, _ = _prefill(view, cache, patches, rows, skip, use_cache=False)
            if progress:
                progress(len(rows))
            yield rows, logits


def patched_logits(view: ModelView, patches: list[Patch], **kwargs) -> torch.Tensor:
    """Full next-token logits at the last target position of every patched run, in input order."""
    out = torch.empty((len(patches), view.unembed.weight.shape[0]))
    for rows, logits in iter_patched_logits(view, patches, **kwargs):
        out[rows] = logits.cpu()
    return out


@dataclass
class TopK:
    ids: torch.Tensor  # (n, k) token ids, best first
    logprobs: torch.Tensor  # (n, k) log-probabilities


def patched_next_token(view: ModelView, patches: list[Patch], top_k: int = 5, **kwargs) -> TopK:
    """The top-k next tokens of every patched run (k=1 gives the prediction)."""
    ids = torch.empty((len(patches), top_k), dtype=torch.long)
    lps = torch.empty((len(patches), top_k))
    for rows, logits in iter_patched_logits(view, patches, **kwargs):
        top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        ids[rows], lps[rows] = top.indices.cpu(), top.values.cpu()
    return TopK(ids, lps)


@torch.no_grad()
def generate(view: ModelView, patches: list[Patch], max_new_tokens: int = 20, batch_size: int = 64,
             reuse_prefix: bool = True, progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of the patched target prompts (the patch acts in the prefill only).

    Each continuation stops after an end-of-sequence token (kept) or `max_new_tokens`; finished
    rows leave the batch so they cost nothing more.
    """
    patches = [p.resolved(view) for p in patches]
    cache = PrefixCache(view, capacity=8 if reuse_prefix else 0)
    eos = torch.tensor(sorted(view.eos_token_ids) or [-1], device=view.device)
    out: list[list[int]] = [[] for _ in patches]
    for _, indices in _groups(view, patches).items():
        for rows in _micro_batches(indices, patches, batch_size, by_layer=False):
            logits, kv = _prefill(view, cache, patches, rows, skip=False, use_cache=True)
            alive = torch.arange(len(rows), device=view.device)
            for step in range(max_new_tokens):
                token = logits.argmax(-1)
                for r, t in zip(alive.tolist(), token.tolist()):
                    out[rows[r]].append(t)
                keep = ~torch.isin(token, eos)
                if step == max_new_tokens - 1 or not keep.any():
                    break
                if not keep.all():
                    alive, token = alive[keep], token[keep]
                    kv.batch_select_indices(keep.nonzero().flatten())
                logits = view.model(input_ids=token[:, None], past_key_values=kv, use_cache=True,
                                    logits_to_keep=1).logits[:, -1].float()
            if progress:
                progress(len(rows))
    return out
