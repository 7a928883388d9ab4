"""Layer and position grids from sweep configs: `all`, `same`, `last`, a list, or a range.

Ranges read `start:stop:step` (stop exclusive, like Python) or `range(start, stop, step)`.
"""

from __future__ import annotations

import re
from typing import Any

from patchscan.errors import UserError

_RANGE = re.compile(r"^\s*(?:range\()?\s*(-?\d+)?\s*[:,]\s*(-?\d+)?\s*(?:[:,]\s*(\d+))?\s*\)?\s*$")


def _as_list(spec: Any) -> list | None:
    if spec is None:
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        return None
    return list(spec)


def parse_layers(spec: Any, n_blocks: int, what: str) -> list[int]:
    """Block indices for `all`, `last`, an int, a list or a range; each checked against the model."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "all":
            return list(range(n_blocks))
        if key == "last":
            return [n_blocks - 1]
        match = _RANGE.match(key)
        if not match:
            raise UserError(f"{what}={spec!r} is not valid; use all, last, same (targets), a list or start:stop:step")
        start, stop, step = match.groups()
        layers = list(range(int(start or 0), int(stop) if stop else n_blocks, int(step or 1)))
    else:
        layers = _as_list(spec)
        if layers is None:
            raise UserError(f"{what} is missing")
    out = []
    for layer in layers:
        if not isinstance(layer, int) or not -n_blocks <= layer < n_blocks:
            raise UserError(
                f"{what}: layer {layer!r} is out of range (the model has {n_blocks} blocks: 0..{n_blocks - 1})"
            )
        out.append(layer % n_blocks)
    if not out:
        raise UserError(f"{what}={spec!r} selects no layer")
    return out


def layer_pairs(source_spec: Any, target_spec: Any, n_source: int, n_target: int) -> list[tuple[int, int]]:
    """The (source block, target block) cells of a sweep; `same` pairs each source with itself."""
    sources = parse_layers(source_spec, n_source, "sweep.source_layers")
    if isinstance(target_spec, str) and target_spec.strip().lower() == "same":
        if n_source != n_target:
            return [(s, round(s * (n_target - 1) / max(n_source - 1, 1))) for s in sources]
        return [(s, s) for s in sources]
    targets = parse_layers(target_spec, n_target, "sweep.target_layers")
    return [(s, t) for s in sources for t in targets]


def parse_positions(spec: Any, length: int) -> list[int]:
    """Source positions of one prompt: `last`, `all`, or a list (negative from the end)."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "last":
            return [length - 1]
        if key == "all":
            return list(range(length))
        raise UserError(f"sweep.source_positions={spec!r} is not valid; use last, all or a list of positions")
    positions = _as_list(spec) or []
    out = []
    for p in positions:
        if not isinstance(p, int) or not -length <= p < length:
            raise UserError(f"sweep.source_positions: position {p!r} is out of range for a prompt of {length} tokens")
        out.append(p % length)
    return out
