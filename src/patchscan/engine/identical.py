"""Identical runs computed once (issue 19).

Grids ask for the same run more than once: attribute extraction's `shuffled_source` control patches
another example's state into the same relation prompt at the same blocks, which is exactly that
example's own Patchscope run. A run is its target tokens, position, block, site and vector (compared
bit for bit), so such rows are generated once. Their stops may differ (each row stops when its own
answer appears): the shared run goes on until every row's stop has held, and each row's tokens are
then cut where its own stop first holds, which is what it would have generated alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from patchscan.engine.decoding import Stop, truncate_at_stop


def _key(patch) -> tuple:
    vector = patch.vector
    if vector is None:
        return (patch.target_ids, patch.target_position, patch.target_layer, patch.target_site, None)
    if vector.device.type == "meta":  # a dry run's stand-in without values: never merged
        return (id(patch),)
    data = vector.detach().to("cpu", copy=False).contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
    where = (patch.target_ids, patch.target_position, patch.target_layer, patch.target_site)
    return (*where, str(data.dtype), tuple(data.shape), digest)


def identical_runs(patches: Sequence) -> list[list[int]]:
    """The patches grouped by identical run, each group in input order, groups by first member."""
    groups: dict[tuple, list[int]] = {}
    for i, patch in enumerate(patches):
        members = groups.setdefault(_key(patch), [])
        first = patches[members[0]].vector if members else None
        if members and first is not None and not torch.equal(first.cpu(), patch.vector.cpu()):
            raise RuntimeError("two different vectors share a 128-bit digest")  # never expected; never merged
        members.append(i)
    return list(groups.values())


class AllStopped:
    """The stop of a run that several rows share: it holds once every row's own stop holds."""

    def __init__(self, stops: Sequence[Stop]):
        self.stops = list(stops)

    def __call__(self, text: str) -> bool:
        return all(stop(text) for stop in self.stops)


def shared_stop(stops: Sequence[Stop | None]) -> Stop | None:
    """One row's stop as is; a row without a stop makes the shared run go to its end."""
    if len(stops) == 1 or any(s is None for s in stops):
        return stops[0] if len(stops) == 1 else None
    return AllStopped(stops)


def per_row(view, groups: list[list[int]], tokens: list[list[int]], stops: Sequence[Stop | None]) -> list[list[int]]:
    """Each row's continuation from its group's: cut where the row's own stop first holds."""
    out: list[list[int]] = [[] for _ in stops]
    for members, run in zip(groups, tokens):
        for i in members:
            out[i] = list(run) if len(members) == 1 else truncate_at_stop(view, run, stops[i])
    return out
