"""Many patched runs per forward, with the target prefix computed once (DESIGN §4).

A Patch overwrites the output of block `layer` at token `position` of `target_ids` with
`vector`. Patches that share target tokens and position form a group: the tokens before the
position run once and their KV cache serves every row of the group; each micro-batch runs only
the suffix (usually one token). For next-token read-outs of a one-token suffix, the blocks up
to the patched one are skipped, since their work at that position would be overwritten.
Generation continues greedily from the patched prefill (the patch is applied there only), each
row until its EOS or its stop (`engine.decoding`).

The scheduling (groups, micro-batches, their sizes from the memory budget, the batch loops) is
written once, here; the model work of each micro-batch goes through a `Backend`. The real one
runs the model; the dry run's `CountingBackend` (`patchscan.runs.dry_run`) counts the same calls.

A patch may target another site of its block (`target_site`, models.families.SITES): the hooks go
on that sub-module (`hooks.site_hooks`) and the fast paths stay on only where they stay exact:

- prefix reuse: on for every site. The tokens before i* never see position i* (causal attention),
  wherever in block ℓ* the patch writes, so their KV cache is the unpatched one.
- skipping blocks below ℓ* (next-token read-outs at the last position): resid_post skips blocks
  0..ℓ*, as before; resid_mid skips blocks 0..ℓ*-1, since block ℓ*'s output there is then
  new + MLP(new), whatever its input was; off for attn_out, mlp_in and mlp_out, whose block output
  adds the patched branch to a residual that depends on every block below.
- shared decoding (`engine.sharing`): on for every site. Every site of block ℓ* comes after that
  block's key and value projections, so blocks 0..ℓ* keep the same KV cache in every row of a
  target prompt, which is all sharing relies on.
- the greedy head (`engine.head`) and identical runs: on. The head reads the final hidden state,
  which the site does not change how to read; identical runs compare the site too.

Rows are grouped by (target ids, position, site), so one micro-batch hooks one site, and
resid_post rows take exactly the code path they took before sites existed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path

import torch

from patchscan.engine.batching import FORWARD_OVERHEAD, plan_layer_chunks, rows_for_budget, run_with_backoff
from patchscan.engine.capture import capture_batch, resolve_position
from patchscan.engine.counting import note_generated
from patchscan.engine.decoding import Padding, Stop, greedy_decode, plain_generate
from patchscan.engine.head import GreedyHead, last_logits, next_tokens
from patchscan.engine.hooks import grouped_patch_hooks, site_hooks, skip_blocks
from patchscan.engine.identical import identical_runs, per_row, shared_stop
from patchscan.engine.kv import PreallocatedLayer, cache_kwargs, caches_merge, merged_cache, returned_cache
from patchscan.engine.mappings import Affine, cached_maps
from patchscan.engine.sharing import SharedDecoding, can_share
from patchscan.models.families import DEFAULT_SITE
from patchscan.models.view import ModelView

# Sites whose next-token read-out may skip lower blocks, and how many blocks below ℓ* that leaves running.
_SKIPS = {DEFAULT_SITE: 0, "resid_mid": 1}


@dataclass(kw_only=True)
class Patch:
    """One patched run: `vector` overwrites the output of block `target_layer` at `target_position`
    of `target_ids` (or another site of that block: `target_site`, models.families.SITES).
    `vector=None` runs the target prompt unpatched (a baseline in the same batch)."""

    target_ids: tuple[int, ...]
    target_position: int
    target_layer: int
    vector: torch.Tensor | None
    target_site: str = DEFAULT_SITE

    def resolved(self, view: ModelView) -> Patch:
        ids = tuple(int(t) for t in self.target_ids)
        if self.target_site != DEFAULT_SITE:
            view.site(self.target_site)  # refused here, in one line, if the family lacks it
        return Patch(
            target_ids=ids,
            target_position=resolve_position(self.target_position, len(ids), "target position"),
            target_layer=view.check_layer(self.target_layer, "target layer"),
            vector=self.vector,
            target_site=self.target_site,
        )


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
        ids = torch.tensor([prefix], device=self.view.input_device)
        base = getattr(self.view.model, "base_model", self.view.model)
        kv = [(layer.keys, layer.values) for layer in returned_cache(base(input_ids=ids, use_cache=True)).layers]
        if self.capacity > 0:
            self._store[prefix] = kv
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)
        return kv

    def expanded(self, prefix: tuple[int, ...], batch: int, room: int | None = None):
        """A fresh cache holding the prefix for `batch` rows (the model extends it in place).

        With `room` (tokens still to come, for generation) each plain layer gets a preallocated
        buffer; without it the prefix stays a broadcast view that the model's update copies once.
        """
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        kv = self.get(prefix)
        if kv is None and room is None:
            return None
        cache = DynamicCache(config=self.view.model.config)
        for i, layer in enumerate(cache.layers):
            k, v = (None, None) if kv is None else (t.expand(batch, *t.shape[1:]) for t in kv[i])
            if type(layer) is DynamicLayer and room is not None:
                cache.layers[i] = PreallocatedLayer(len(prefix) + room, k, v)
            elif k is None:
                continue
            elif type(layer) is DynamicLayer:  # keep the broadcast view: the model's own update copies it once
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            else:  # e.g. a sliding-window layer: it holds only the window's last tokens of the prefix
                layer.update(k, v)
                if hasattr(layer, "cumulative_length"):  # its attention mask counts from the whole prefix
                    layer.cumulative_length = len(prefix)
        return cache


def _groups(patches: list[Patch], patched_only: bool = False) -> dict[tuple, list[int]]:
    """Patch indices by (target ids, position, site): rows that share one prefix cache and one site."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(patches):
        if not (patched_only and p.vector is None):
            groups.setdefault((p.target_ids, p.target_position, p.target_site), []).append(i)
    return groups


def bytes_per_row(view: ModelView, seq_len: int) -> int:
    """A generous estimate of one row's memory: its KV cache, logits and block activations.

    The logits row (three float32 copies: the logits, the log-sum-exp's and the top-k's) dominates
    for large vocabularies: 3.1 MB of Gemma 3's 262,144 tokens against 0.6 MB of SmolLM2's 49,152.
    Sliding-window blocks keep at most their window in the KV cache.
    """
    config = view.model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or view.width // config.num_attention_heads
    elem = torch.finfo(view.dtype).bits // 8
    kv = 2 * heads * head_dim * view.kv_tokens(seq_len) * elem
    logits = 3 * view.vocab_size * 4
    activations = 8 * (getattr(config, "intermediate_size", None) or 4 * view.width) * elem
    return kv + logits + activations


def _batch_size(view: ModelView, batch_size: int | str | None, seq_len: int, budget_gb: float | None) -> int:
    if batch_size in (None, "auto", 0):
        return rows_for_budget(bytes_per_row(view, seq_len), view.device, budget_gb)
    return int(batch_size)


def _micro_batches(
    view: ModelView, indices: list[int], patches: list[Patch], batch_size: int, skip: bool
) -> Iterator[list[int]]:
    if skip:  # sorted by target block, cut where skipping the blocks below pays for another forward
        layers = [patches[i].target_layer for i in indices]
        overhead = FORWARD_OVERHEAD.get(view.device.type, 100.0)
        for chunk in plan_layer_chunks(layers, view.n_blocks, batch_size, overhead):
            yield [indices[k] for k in chunk]
    else:
        for s in range(0, len(indices), batch_size):
            yield indices[s : s + batch_size]


@torch.no_grad()
def _prefill(
    view: ModelView,
    cache: PrefixCache,
    patches: list[Patch],
    rows: list[int],
    skip: bool,
    use_cache: bool,
    room: int | None = None,
    readout: Callable[[dict], tuple] | None = None,
):
    """Run the suffix of one group for `rows`, patched; return `readout(model kwargs)`: by default
    (last-position logits, kv cache); generation reads the greedy tokens instead (`head.next_tokens`)."""
    first = patches[rows[0]]
    suffix = first.target_ids[first.target_position :]
    n = len(rows)
    input_ids = torch.tensor([suffix] * n, device=view.input_device)
    patched = [k for k, i in enumerate(rows) if patches[i].vector is not None]
    layers = [patches[rows[k]].target_layer for k in patched]
    point = None if first.target_site == DEFAULT_SITE else view.site(first.target_site)  # one site per group
    hooks = {}
    if patched:
        vectors = torch.stack([patches[rows[k]].vector.to(view.device) for k in patched])  # hooks move them on
        hooks = grouped_patch_hooks(layers, patched, [0] * len(patched), vectors)
    kv = cache.expanded(first.target_ids[: first.target_position], n, room=None if room is None else len(suffix) + room)
    kwargs = dict(input_ids=input_ids, use_cache=use_cache, **cache_kwargs(view.model, kv))
    readout = readout or partial(last_logits, view)
    with site_hooks(view.blocks, point, hooks):
        if skip:  # rows are patched at their last position: blocks below the lowest patch do nothing
            with skip_blocks(view.blocks, min(layers) - _SKIPS[first.target_site], view.block_returns_tuple):
                return readout(kwargs)
        return readout(kwargs)


def iter_patched_logits(
    view: ModelView,
    patches: list[Patch],
    batch_size: int | str | None = 256,
    reuse_prefix: bool = True,
    skip_blocks_below: bool = True,
    progress: Callable[[int], None] | None = None,
    memory_budget_gb: float | None = None,
    backend: Backend | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (patch indices, last-position logits) micro-batch by micro-batch.

    `batch_size="auto"` sizes micro-batches from free GPU memory or `memory_budget_gb`; an
    out-of-memory error halves the micro-batch and retries it.
    """
    backend = backend or MODEL
    patches = [p.resolved(view) for p in patches]
    cache = backend.prefix_cache(view, capacity=8 if reuse_prefix else 0)
    for (ids, position, site), indices in _groups(patches).items():
        skip = (
            skip_blocks_below
            and site in _SKIPS
            and position == len(ids) - 1
            and all(patches[i].vector is not None for i in indices)
        )
        size = backend.batch_size(view, batch_size, len(ids), memory_budget_gb)
        for chunk in _micro_batches(view, indices, patches, size, skip):
            for rows, logits in run_with_backoff(
                chunk,
                lambda rows: backend.logits(view, cache, patches, rows, skip),  # noqa: B023 (called at once)
            ):
                if progress:
                    progress(len(rows))
                yield rows, logits


def patched_logits(view: ModelView, patches: list[Patch], **kwargs) -> torch.Tensor:
    """Full next-token logits at the last target position of every patched run, in input order."""
    out = torch.empty((len(patches), view.vocab_size))
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
    backend = kwargs.get("backend") or MODEL
    for rows, logits in iter_patched_logits(view, patches, **kwargs):
        ids[rows], lps[rows] = backend.top_k(logits, top_k)
    return TopK(ids, lps)


def generate(
    view: ModelView,
    patches: list[Patch],
    max_new_tokens: int = 20,
    batch_size: int | str | None = 256,
    reuse_prefix: bool = True,
    progress: Callable[[int], None] | None = None,
    memory_budget_gb: float | None = None,
    stops: Sequence[Stop | None] | None = None,
    share_lower_blocks: bool = True,
    backend: Backend | None = None,
) -> list[list[int]]:
    """Greedy continuations of the patched target prompts (the patch acts in the prefill only).

    Each continuation stops after an end-of-sequence token (kept), after the token that makes its
    stop (`stops[i]`, a predicate on the decoded continuation) hold, or at `max_new_tokens`;
    finished rows leave the batch so they cost nothing more. A batch may hold the rows of several
    target prompts: each prompt runs its own prefill, then the batch decodes as one, left-padded
    with a mask (`kv.merged_cache`). Unpatched rows (`vector=None`), whose prompts usually all
    differ, run as left-padded batches of their own (`decoding.plain_generate`).
    With `share_lower_blocks` (the default), rows of one target prompt that have generated the same
    tokens run blocks 0..ℓ* once while decoding (`engine.sharing`; unknown architectures decode plainly).
    Identical patches (same target, position, block and vector) are generated once (`engine.identical`).
    """
    backend = backend or MODEL
    patches = [p.resolved(view) for p in patches]
    stops = list(stops) if stops is not None else [None] * len(patches)
    if len(stops) != len(patches):
        raise ValueError(f"{len(stops)} stops for {len(patches)} patches")
    groups = identical_runs(patches)  # identical runs are generated once (engine.identical)
    runs = [patches[g[0]] for g in groups]
    run_stops = [shared_stop([stops[i] for i in g]) for g in groups]
    out: list[list[int]] = [[] for _ in runs]
    sizing = (batch_size, memory_budget_gb)

    def deliver(rows: list[int], tokens: list[list[int]]) -> None:
        for r, t in zip(rows, tokens):
            out[r] = t
        if progress:
            progress(sum(len(groups[r]) for r in rows))

    for rows, tokens in _generate_plain(backend, view, runs, run_stops, max_new_tokens, sizing):
        deliver(rows, tokens)
    options = (reuse_prefix, share_lower_blocks)
    for rows, tokens in _generate_patched(backend, view, runs, run_stops, max_new_tokens, sizing, options):
        deliver(rows, tokens)
    note_generated(sum(len(t) for t in out))
    return per_row(view, groups, out, stops)


def _generate_plain(
    backend, view, patches, stops, max_new_tokens, sizing
) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Unpatched rows, sorted by length so each batch pads little."""
    plain = sorted((i for i, p in enumerate(patches) if p.vector is None), key=lambda i: len(patches[i].target_ids))
    if not plain:
        return
    longest = len(patches[plain[-1]].target_ids)
    size = backend.batch_size(view, sizing[0], longest + max_new_tokens, sizing[1])
    for s in range(0, len(plain), size):
        yield from run_with_backoff(
            plain[s : s + size],
            lambda rows: backend.plain_generate(
                view, [patches[i].target_ids for i in rows], max_new_tokens, [stops[i] for i in rows]
            ),
        )


def _generate_patched(
    backend, view, patches, stops, max_new_tokens, sizing, options
) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Patched rows in batches that may hold several target prompts: each prompt's rows run their
    own prefill (one prefix cache, the patched suffix), then the batch decodes as one, the caches
    merged with left padding and a mask (`kv.merged_cache`). Many small groups (multihop's
    per-example prompts) so make full batches instead of many small ones."""
    reuse_prefix, share = options
    cache = backend.prefix_cache(view, capacity=8 if reuse_prefix else 0)
    head = backend.greedy_head(view)
    groups = _groups(patches, patched_only=True)
    merges = caches_merge(view.model.config)

    def run(rows: list[int]) -> list[list[int]]:
        parts = _by_group(patches, rows)
        if len(parts) > 1 and not merges:  # e.g. sliding-window layers: prompt by prompt
            return [t for part in parts for t in run(part)]
        row_stops = [stops[i] for i in rows]
        return backend.generate_parts(view, cache, head, patches, parts, row_stops, max_new_tokens, share)

    flat = [i for indices in groups.values() for i in indices]
    if flat:
        longest = max(len(ids) for ids, _, _ in groups)
        size = backend.batch_size(view, sizing[0], longest + max_new_tokens, sizing[1])
        for s in range(0, len(flat), size):
            yield from run_with_backoff(flat[s : s + size], run)


def _by_group(patches: list[Patch], rows: list[int]) -> list[list[int]]:
    """`rows` cut where the target prompt, position or site changes (rows come group by group)."""
    key = lambda i: (patches[i].target_ids, patches[i].target_position, patches[i].target_site)  # noqa: E731
    return [list(part) for _, part in groupby(rows, key=key)]


class Backend:
    """The model work of one micro-batch, as the schedulers above (and `capture.capture`) ask for it.

    This one runs the model. The dry run's `CountingBackend` (`patchscan.runs.dry_run`) answers the same
    calls by counting forward passes, tokens and memory, and returns stand-in outputs.
    """

    def batch_size(self, view: ModelView, batch_size, seq_len: int, budget_gb: float | None) -> int:
        return _batch_size(view, batch_size, seq_len, budget_gb)

    def prefix_cache(self, view: ModelView, capacity: int) -> PrefixCache:
        return PrefixCache(view, capacity=capacity)

    def greedy_head(self, view: ModelView) -> GreedyHead | None:
        return GreedyHead.for_view(view)

    def fit_affine(self, x: torch.Tensor, y: torch.Tensor, ridge: float) -> Affine:
        """A fitted map's least squares (`engine.alignment`: affine lens, cross-model maps)."""
        return Affine.fit(x, y, ridge=ridge)

    def cached_maps(self, folder: Callable[[], Path], files: dict, shape: tuple[int, int], fit) -> dict:
        """Fitted maps from the map cache in `folder()` (its key is the models' content), else `fit()`."""
        return cached_maps(folder(), files, shape, fit)

    def capture(self, view: ModelView, batch, positions, layers, want, with_logprobs, site="resid_post"):
        return capture_batch(view, batch, positions, layers, want, with_logprobs, site)

    def logits(self, view: ModelView, cache: PrefixCache, patches: list[Patch], rows: list[int], skip: bool):
        """Last-position logits of `rows` (one group), patched."""
        return _prefill(view, cache, patches, rows, skip, use_cache=False)[0]

    def top_k(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, log-probabilities) of the k best tokens: log-probabilities of the top k only, no full log-softmax."""
        top = logits.topk(k, dim=-1)
        return top.indices.cpu(), (top.values - logits.logsumexp(-1, keepdim=True)).cpu()

    def plain_generate(self, view: ModelView, prompts, max_new_tokens: int, stops) -> list[list[int]]:
        return plain_generate(view, prompts, max_new_tokens, stops)

    @torch.no_grad()
    def generate_parts(
        self, view, cache, head, patches, parts: list[list[int]], stops, max_new_tokens: int, share: bool
    ) -> list[list[int]]:
        """Greedy continuations of the rows of `parts` (groups whose caches merge): each part's
        patched prefill, then one decode of all rows."""
        readout = partial(next_tokens, view, head)
        room = max_new_tokens if len(parts) == 1 else 0  # prompts that merge get their room in the merged cache
        prefilled = [_prefill(view, cache, patches, part, False, True, room=room, readout=readout) for part in parts]
        caches = [kv for _, kv in prefilled]
        kv, mask = (caches[0], None) if len(parts) == 1 else merged_cache(view.model.config, caches, max_new_tokens)
        padding = None if mask is None else Padding(mask, view.input_device)
        first = torch.cat([first for first, _ in prefilled])
        rows = [i for part in parts for i in part]
        if not (share and len(rows) > 1 and can_share(view, kv)):
            return greedy_decode(view, first, kv, max_new_tokens, stops, head=head, padding=padding)
        paths = [g for g, part in enumerate(parts) for _ in part]  # rows of different prompts share nothing
        shared = SharedDecoding(view.blocks, kv, [patches[i].target_layer for i in rows], paths)
        with shared.installed():
            return greedy_decode(view, first, kv, max_new_tokens, stops, shared, head=head, padding=padding)


MODEL = Backend()
