"""KV caches: the forward's cache argument under its current name, and a layer with room reserved
for the tokens still to come.

transformers 5.x renamed the forward's `past_key_values` argument (and output field) to `cache`; the
old name still works but warns that it goes in 5.40. `cache_kwargs` and `returned_cache` use the name
the installed version's model declares, so the engine passes and reads caches without the warning on
both sides of the rename.

transformers' DynamicLayer grows by torch.cat at every step, copying the whole cache each time
(a quarter of greedy generation's time on a CPU here). This layer writes into a buffer sized
for prefix + suffix + new tokens, doubling it only if that runs out, and otherwise behaves as a
DynamicLayer (it is one), so the model's attention code sees no difference.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from transformers.cache_utils import DynamicLayer


@functools.cache
def _cache_name(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model, kv) -> dict:
    """The keyword argument that hands `kv` (a Cache, or None) to `model`'s forward."""
    return {_cache_name(type(model)): kv}


def returned_cache(out):
    """The KV cache a forward returned (its `cache` field, or `past_key_values` before the rename)."""
    names = {f.name for f in dataclasses.fields(out)}
    return getattr(out, "cache" if "cache" in names else "past_key_values")


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.capacity = capacity
        self._length = 0
        if keys is not None:
            self._allocate(keys)
            self._write(keys, values)

    def _allocate(self, like: torch.Tensor) -> None:
        batch, heads, length, dim = like.shape
        self.dtype, self.device = like.dtype, like.device
        size = max(self.capacity, length)
        self._keys = like.new_empty(batch, heads, size, dim)
        self._values = like.new_empty(batch, heads, size, dim)
        self.is_initialized = True

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self._length + keys.shape[-2]
        if end > self._keys.shape[-2]:  # out of room: double
            grow = max(end, 2 * self._keys.shape[-2]) - self._keys.shape[-2]
            pad = self._keys.new_empty(*self._keys.shape[:2], grow, self._keys.shape[-1])
            self._keys = torch.cat([self._keys, pad], dim=-2)
            self._values = torch.cat([self._values, torch.empty_like(pad)], dim=-2)
        self._keys[:, :, self._length : end] = keys
        self._values[:, :, self._length : end] = values
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self._allocate(key_states)
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self._keys.device)  # a model split over devices keeps each layer on its own
            self._keys, self._values = self._kept(self._keys, indices), self._kept(self._values, indices)
            self.keys, self.values = self._keys[:, :, : self._length], self._values[:, :, : self._length]

    def _kept(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The rows kept, in a buffer of the same room; only the positions written are copied."""
        kept = buffer.new_empty(len(indices), *buffer.shape[1:])
        # index_select into the slice: a row-wise copy, 3x faster than the equivalent buffer[indices, :, :n]
        torch.index_select(buffer[:, :, : self._length], 0, indices, out=kept[:, :, : self._length])
        return kept

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take over filled buffers (`length` positions written, the rest room to come)."""
        self.dtype, self.device = keys.dtype, keys.device
        self._keys, self._values, self._length = keys, values, length
        self.capacity = keys.shape[-2]
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def reset(self) -> None:
        self._length = 0
        super().reset()


def preallocated_cache(config, capacity: int):
    """An empty DynamicCache whose plain layers are `PreallocatedLayer`s with room for `capacity`
    tokens; other layers (sliding windows) stay the model's own."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PreallocatedLayer(capacity)
    return cache


def merged_cache(config, caches: list, room: int) -> tuple[object, torch.Tensor | None]:
    """The rows of several caches in one, each right-aligned to the longest (left padding), with
    `room` for the tokens to come; and the padding mask, None when every cache has one length.

    Only caches whose layers are all `PreallocatedLayer`s merge (`caches_merge`)."""
    lengths = [c.get_seq_length() for c in caches]
    width = max(lengths)
    counts = [c.layers[0].keys.shape[0] for c in caches]
    out = preallocated_cache(config, width + room)
    for i, layer in enumerate(out.layers):
        like = caches[0].layers[i].keys
        shape = (sum(counts), like.shape[1], width + room, like.shape[3])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        start = 0
        for cache, rows, length in zip(caches, counts, lengths):
            part, pad = cache.layers[i], width - length
            keys[start : start + rows, :, :pad] = 0  # never attended, but must be finite (0 * nan is nan)
            values[start : start + rows, :, :pad] = 0
            keys[start : start + rows, :, pad:width] = part.keys
            values[start : start + rows, :, pad:width] = part.values
            start += rows
        layer.adopt(keys, values, width)
    if len(set(lengths)) == 1:
        return out, None
    mask = torch.cat([torch.arange(width).ge(width - n).long().expand(rows, width) for n, rows in zip(lengths, counts)])
    return out, mask


def caches_merge(config) -> bool:
    """Do this model's caches merge (`merged_cache`): is every layer a plain one, which generation
    preallocates? Sliding-window layers keep their own bookkeeping and do not."""
    from transformers import DynamicCache

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
