"""Greedy decoding with per-row stops: a row leaves the batch at its EOS or once its answer is decided.

A stop is a predicate on a row's decoded continuation (`patchscan.metrics.answers`), checked
after every new token; the row keeps the token that decided it and nothing after. Rows that
stop leave the batch exactly as EOS rows do, so they cost nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from patchscan.engine.capture import pad_batch
from patchscan.engine.head import GreedyHead, next_tokens
from patchscan.engine.kv import cache_kwargs, preallocated_cache
from patchscan.models.view import ModelView

Stop = Callable[[str], bool]


def finished(view: ModelView, tokens: list[int], stop: Stop | None, eos: set[int]) -> bool:
    """Is this continuation over: its last token is an EOS, or its stop holds on the decoded text?"""
    return tokens[-1] in eos or (stop is not None and bool(stop(view.decode(tokens))))


def truncate_at_stop(view: ModelView, tokens: Sequence[int], stop: Stop | None) -> list[int]:
    """`tokens` cut where greedy decoding with `stop` would have stopped (the reference, for tests
    and the bench: a full continuation cut this way equals the stopped one)."""
    eos = set(view.eos_token_ids)
    for k in range(1, len(tokens) + 1):
        if finished(view, list(tokens[:k]), stop, eos):
            return list(tokens[:k])
    return list(tokens)


def _step(view: ModelView, token: torch.Tensor, kv, head: GreedyHead | None, padding: Padding | None) -> torch.Tensor:
    ids = token[:, None].to(view.input_device)
    extra = padding.step_kwargs() if padding is not None else {}
    return next_tokens(view, head, dict(input_ids=ids, **cache_kwargs(view.model, kv), use_cache=True, **extra))[0]


class Padding:
    """Rows whose prompts differ in length, decoded in one batch: each row's padding mask over the
    KV cache and its next position (the count of its real tokens), kept in step with the rows.

    The mask is passed as HF's generate passes it, so padding is never attended; positions are the
    row's own, so rotary embeddings match the unpadded prompt."""

    def __init__(self, mask: torch.Tensor, device: torch.device):
        self.mask = mask.to(device)
        self.positions = self.mask.sum(-1)  # the position of each row's next token

    def advance(self, keep: list[int]) -> None:
        """After a step: the rows that go on, each with one more cached token."""
        if len(keep) < self.mask.shape[0]:
            index = torch.tensor(keep, device=self.mask.device)
            self.mask, self.positions = self.mask[index], self.positions[index]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)

    def step_kwargs(self) -> dict:
        """The mask and positions of the next one-token step (then counted as cached)."""
        kwargs = dict(attention_mask=self.mask, position_ids=self.positions[:, None])
        self.positions = self.positions + 1
        return kwargs

    @staticmethod
    def prefill_kwargs(mask: torch.Tensor, device: torch.device) -> dict:
        """A left-padded prompt batch's mask and positions (padding gets position 0, as in generate)."""
        mask = mask.to(device)
        return dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


class Compaction:
    """The plain batch: finished rows leave the KV cache (`sharing.SharedDecoding` is the other kind)."""

    def __init__(self, kv, n: int):
        self.kv, self.n = kv, n

    def advance(self, keep: list[int], tokens: list[int]) -> None:
        if len(keep) < self.n:
            self.kv.batch_select_indices(torch.tensor(keep))  # each layer moves the indices to its device
        self.n = len(keep)


@torch.no_grad()
def greedy_decode(
    view: ModelView,
    token: torch.Tensor,
    kv,
    max_new_tokens: int,
    stops: Sequence[Stop | None],
    batch=None,
    head: GreedyHead | None = None,
    padding: Padding | None = None,
) -> list[list[int]]:
    """Continue greedily from a prefill's greedy tokens and KV cache (one row per stop); `batch`
    (default: a `Compaction`) follows the rows that go on after each step; `head` reads each step's
    tokens without the full logits (None: the model's own logits); `padding` (rows of different
    lengths) gives each step its mask and positions."""
    batch = batch or Compaction(kv, len(stops))
    eos = set(view.eos_token_ids)
    tokens: list[list[int]] = [[] for _ in stops]
    alive = list(range(len(stops)))
    for step in range(max_new_tokens):
        keep = []
        for k, (r, t) in enumerate(zip(alive, token.tolist())):
            tokens[r].append(t)
            if not finished(view, tokens[r], stops[r], eos):
                keep.append(k)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(alive):  # finished rows leave the batch
            alive = [alive[k] for k in keep]
            token = token[torch.tensor(keep, device=token.device)]
        batch.advance(keep, token.tolist())
        if padding is not None:
            padding.advance(keep)
        token = _step(view, token, kv, head, padding)
    return tokens


class _RowStops(StoppingCriteria):
    """Stops for Hugging Face `generate`: a per-row done flag, and where each row stopped."""

    def __init__(self, view: ModelView, stops: Sequence[Stop | None], start: int):
        self.view, self.stops, self.start = view, list(stops), start
        self.lengths: list[int | None] = [None] * len(stops)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for r, stop in enumerate(self.stops):
            if stop is not None and self.lengths[r] is None:
                new = input_ids[r, self.start :].tolist()
                if stop(self.view.decode(new)):
                    self.lengths[r] = len(new)
        return torch.tensor([n is not None for n in self.lengths], device=input_ids.device)


@torch.no_grad()
def plain_generate(
    view: ModelView, prompts: list[tuple[int, ...]], max_new_tokens: int, stops: Sequence[Stop | None] | None = None
) -> list[list[int]]:
    """Unpatched greedy continuations of different prompts in one batch, left-padded with an
    attention mask so padding is never attended; each cut after its first EOS or stop.

    Known families decode in our own loop (finished rows leave the batch, the greedy head reads the
    token, the KV cache has room reserved); others through HF's `generate`."""
    stops = list(stops) if stops is not None else [None] * len(prompts)
    if not view.family.padded_decoding:  # models.families: per-row positions and a 2-D mask
        return _hf_generate(view, prompts, max_new_tokens, stops)
    ids, mask = pad_batch([list(p) for p in prompts], _pad_id(view), left=True)
    head = GreedyHead.for_view(view)
    kv = preallocated_cache(view.model.config, ids.shape[1] + max_new_tokens)
    device = view.input_device
    kwargs = dict(input_ids=ids.to(device), use_cache=True, **cache_kwargs(view.model, kv))
    kwargs.update(Padding.prefill_kwargs(mask, device))
    first, kv = next_tokens(view, head, kwargs)
    return greedy_decode(view, first, kv, max_new_tokens, stops, head=head, padding=Padding(mask, device))


def _pad_id(view: ModelView) -> int:
    return view.tokenizer.pad_token_id if view.tokenizer.pad_token_id is not None else 0


def _hf_generate(
    view: ModelView, prompts: list[tuple[int, ...]], max_new_tokens: int, stops: Sequence[Stop | None]
) -> list[list[int]]:
    """`plain_generate` through HF's generate: a stopping criterion marks each row's stop."""
    eos = view.eos_token_ids
    pad = _pad_id(view)
    ids, mask = pad_batch([list(p) for p in prompts], pad, left=True)
    extra = {}
    row_stops = None
    if any(s is not None for s in stops):
        row_stops = _RowStops(view, stops, ids.shape[1])
        extra["stopping_criteria"] = StoppingCriteriaList([row_stops])
    out = view.model.generate(
        input_ids=ids.to(view.input_device),
        attention_mask=mask.to(view.input_device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=sorted(eos) or None,
        **extra,
    )
    tokens = []
    for r, row in enumerate(out[:, ids.shape[1] :].tolist()):
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        if row_stops is not None and row_stops.lengths[r] is not None:
            cut = min(cut, row_stops.lengths[r])
        tokens.append(row[:cut])
    return tokens
