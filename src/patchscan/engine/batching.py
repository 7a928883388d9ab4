"""How rows become micro-batches: layer-aware chunking, a memory budget, and OOM back-off.

Rows patched at their last target position skip the blocks below the lowest patched block of
their micro-batch. Sorting rows by target block and cutting the sorted list well trades the
fixed cost of a forward against the blocks skipped: `plan_layer_chunks` finds the best cuts by
dynamic programming over the distinct blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

# Fixed cost of one forward, in units of "one row through one block": Python and kernel-launch
# overhead dominate on a GPU, arithmetic on a CPU.
FORWARD_OVERHEAD = {"cpu": 100.0, "cuda": 4000.0}


def plan_layer_chunks(
    layers: Sequence[int], n_blocks: int, batch_size: int, overhead: float = 100.0
) -> list[list[int]]:
    """Cut row indices (any order) into micro-batches of at most `batch_size` rows.

    A micro-batch starting at block b costs `overhead` + rows x (n_blocks - 1 - b).
    """
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    if not order:
        return []
    distinct = sorted(set(layers))
    counts = [sum(1 for x in layers if x == d) for d in distinct]
    m = len(distinct)
    best = [0.0] + [math.inf] * m  # best[j]: cost of the first j distinct blocks
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        rows = 0
        for i in range(j, 0, -1):  # chunk = distinct[i-1 .. j-1]
            rows += counts[i - 1]
            cost = best[i - 1] + math.ceil(rows / batch_size) * overhead + rows * (n_blocks - 1 - distinct[i - 1])
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], m
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    chunks, start = [], 0
    for lo, hi in reversed(bounds):
        n_rows = sum(counts[lo:hi])
        span = order[start : start + n_rows]
        start += n_rows
        chunks += [span[k : k + batch_size] for k in range(0, n_rows, batch_size)]
    return chunks


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_with_backoff(rows: list[T], fn: Callable[[list[T]], object]) -> Iterator[tuple[list[T], object]]:
    """Run fn on rows; on an out-of-memory error halve the rows and retry, losing and repeating none."""
    try:
        yield rows, fn(rows)
        return
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc) or len(rows) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(rows) // 2
    log.warning("out of memory with %d rows: retrying as %d + %d", len(rows), half, len(rows) - half)
    yield from run_with_backoff(rows[:half], fn)
    yield from run_with_backoff(rows[half:], fn)


def rows_for_budget(bytes_per_row: int, device: torch.device, budget_gb: float | None = None, cap: int = 1024) -> int:
    """Micro-batch rows that fit a memory budget: free GPU memory (80%), or `budget_gb` on CPU."""
    if budget_gb is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.8 * free
    else:
        budget = float(budget_gb if budget_gb is not None else 4.0) * 2**30
    return max(1, min(cap, int(budget // max(bytes_per_row, 1))))
