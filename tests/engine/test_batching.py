"""Micro-batching: layer-aware chunks cover every row once; OOM back-off loses and repeats none."""

from __future__ import annotations

import random

import pytest
import torch

from patchscan.engine.batching import plan_layer_chunks, rows_for_budget, run_with_backoff


@pytest.mark.parametrize("overhead", [0.0, 100.0, 1e9])
def test_layer_chunks_cover_all_rows_once_within_the_batch_size(overhead):
    rng = random.Random(0)
    layers = [rng.randrange(30) for _ in range(500)]
    chunks = plan_layer_chunks(layers, 30, batch_size=64, overhead=overhead)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(500)) and all(len(c) <= 64 for c in chunks)
    if overhead == 0.0:  # free forwards: every chunk holds one block only, so nothing runs twice
        assert all(len({layers[i] for i in c}) == 1 for c in chunks)
    if overhead == 1e9:  # costly forwards: as few as the batch size allows
        assert len(chunks) == 8


def test_backoff_halves_on_out_of_memory_without_losing_rows():
    seen = []

    def fn(rows):
        if len(rows) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        seen.extend(rows)
        return [r * 10 for r in rows]

    results = list(run_with_backoff(list(range(13)), fn))
    assert seen == list(range(13))
    assert [x for _, out in results for x in out] == [r * 10 for r in range(13)]


def test_backoff_reraises_other_errors():
    def fn(rows):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape"):
        list(run_with_backoff([1, 2], fn))


def test_budget_sets_rows():
    assert rows_for_budget(2**20, torch.device("cpu"), budget_gb=0.5) == 512
    assert rows_for_budget(2**40, torch.device("cpu"), budget_gb=1) == 1
