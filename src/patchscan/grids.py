"""The one grammar for blocks and positions: sweep configs, the CLI's --layers and the API all read it.

A spec is `all`, `last`, an int (negative counts from the end), a list, a slice `start:stop[:step]`
with Python's own semantics (`range(n)[start:stop:step]`, so `-2:4` of 4 blocks is [2, 3]), a
literal `range(start, stop[, step])`, or a comma list mixing them (`0,10,20:30:2`; list items may
be such strings too, as Hydra gives `[0,20:30:2]`). What Python would do in silence is refused with
one `UserError` line: a step of 0, a slice bound beyond the sequence (Python would clip it), an
index out of range, an empty selection, and a block or position named twice (which would run it
twice and double its rows).

>>> from patchscan.grids import blocks
>>> blocks("0:10:3", 30), blocks("2,5,-1", 30), blocks("0,20:", 24), blocks("-2:4", 4)
([0, 3, 6, 9], [2, 5, 29], [0, 20, 21, 22, 23], [2, 3])
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from numbers import Integral
from typing import Any

from patchscan.errors import UserError

_INT = re.compile(r"[+-]?\d+")
_SLICE = re.compile(r"([+-]?\d+)?:([+-]?\d+)?(?::([+-]?\d+)?)?")
_RANGE = re.compile(r"range\(([^()]*)\)")
_USE = "use all, last, an index, a slice start:stop[:step] or a list like 0,5,10:20:2"


def _shown(spec: Any) -> str:
    if isinstance(spec, (str, Integral)) and not isinstance(spec, bool):
        return repr(spec) if isinstance(spec, str) else str(int(spec))
    try:
        return repr([_shown_item(v) for v in spec])
    except TypeError:
        return repr(spec)


def _shown_item(value: Any) -> Any:
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) else value


def _text_parts(text: str, label: str) -> list:
    """The parts of one string: names, ints, slices and literal ranges (no sequence length needed)."""
    key = text.strip().lower()
    key = key[1:-1] if key.startswith("[") and key.endswith("]") else key  # a list written as text
    match = _RANGE.fullmatch(key)
    if match:
        args = [a.strip() for a in match.group(1).split(",")]
        if not 1 <= len(args) <= 3 or not all(_INT.fullmatch(a) for a in args):
            raise UserError(f"{label} is not valid; {_USE}")
        if len(args) == 3 and int(args[2]) == 0:
            raise UserError(f"{label}: a range step of 0 is not valid; use a step of 1 or more (or negative)")
        return [tuple(range(*map(int, args)))]
    parts: list = []
    for token in (t.strip() for t in key.split(",")):
        if token in ("all", "last") or _INT.fullmatch(token):
            parts.append(token if token in ("all", "last") else int(token))
            continue
        match = _SLICE.fullmatch(token)
        if not match:
            raise UserError(f"{label} is not valid; {_USE}")
        start, stop, step = (None if g is None else int(g) for g in match.groups())
        if step == 0:
            raise UserError(f"{label}: a slice step of 0 is not valid; use a step of 1 or more (or negative)")
        parts.append(slice(start, stop, step))
    return parts


def parse(spec: Any, what: str) -> list:
    """The parts of a spec, checked for syntax and zero steps before anything is loaded."""
    label = f"{what}={_shown(spec)}"
    if spec is None:
        raise UserError(f"{what} is missing; {_USE}")
    if isinstance(spec, bool):
        raise UserError(f"{label} is not valid; {_USE}")
    if isinstance(spec, Integral):
        return [int(spec)]
    if isinstance(spec, str):
        return _text_parts(spec, label)
    if not isinstance(spec, Iterable):
        raise UserError(f"{label} is not valid; {_USE}")
    parts: list = []
    for item in spec:
        if isinstance(item, Integral) and not isinstance(item, bool):
            parts.append(operator.index(item))
        elif isinstance(item, str):
            parts += _text_parts(item, label)
        else:
            raise UserError(f"{label}: {item!r} is not valid; {_USE}")
    return parts


class _Target:
    """What a spec is resolved against, and how its errors name it."""

    def __init__(self, n: int, label: str, noun: str, where: str, units: str, single: bool):
        self.n, self.label, self.noun, self.where, self.units, self.single = n, label, noun, where, units, single

    def refuse(self, head: str, extent: str | None = None) -> UserError:
        n = self.n
        extent = extent or (f"{n} {self.units}: 0..{n - 1}, or -{n}..-1 from the end" if n else f"{n} {self.units}")
        return UserError(f"{head} for {self.where} ({extent})")

    def indices(self, part) -> range | list[int]:
        n = self.n
        if part == "all":
            return range(n)
        if part == "last":
            return range(n)[-1:]
        if isinstance(part, slice):
            for bound in (part.start, part.stop):
                if bound is not None and not -n <= bound <= n:
                    head = f"{self.label}: slice bound {bound} is out of range"
                    raise self.refuse(head, f"{n} {self.units}: slice bounds -{n}..{n}")
            return range(n)[part]
        out = []
        for value in part if isinstance(part, tuple) else (part,):
            if not -n <= value < n:
                head = self.label if self.single else f"{self.label}: {self.noun} {value}"
                raise self.refuse(f"{head} is out of range")
            out.append(value % n)
        return out


def select(spec: Any, n: int, what: str, noun: str, where: str, units: str, distinct: bool = True) -> list[int]:
    """Indices into a sequence of `n` (blocks of a model, tokens of a prompt), in the spec's order;
    `distinct=False` keeps indices that coincide (0 and -1 of a one-token prompt)."""
    parts = parse(spec, what)
    single = len(parts) == 1 and isinstance(parts[0], int) and not isinstance(spec, str | Iterable)
    target = _Target(n, f"{what}={_shown(spec)}", noun, where, units, single)
    out = [i for part in parts for i in target.indices(part)]
    if not out:
        raise target.refuse(f"{target.label} selects no {noun}")
    seen: set[int] = set()
    for value in out if distinct else ():
        if value in seen:
            raise UserError(f"{target.label} names {noun} {value} twice; name each {noun} once")
        seen.add(value)
    return out


def _only(indices: list[int], spec: Any, what: str, noun: str) -> int:
    if len(indices) != 1:
        raise UserError(f"{what}={_shown(spec)} selects {len(indices)} {noun}s ({indices}); name one")
    return indices[0]


def blocks(
    spec: Any, n_blocks: int, what: str = "layers", where: str = "the model", distinct: bool = True
) -> list[int]:
    """Block indices (0-based) of a model with `n_blocks` blocks."""
    return select(spec, n_blocks, what, "layer", where, "blocks", distinct)


def block(spec: Any, n_blocks: int, what: str = "layer", where: str = "the model") -> int:
    """One block index (an int, or a spec that selects exactly one block, e.g. `last`)."""
    return _only(blocks(spec, n_blocks, what, where), spec, what, "layer")


def positions(
    spec: Any, length: int, what: str = "positions", where: str | None = None, distinct: bool = True
) -> list[int]:
    """Token positions (0-based) of a prompt of `length` tokens."""
    return select(spec, length, what, "position", where or "the prompt", "tokens", distinct)


def position(spec: Any, length: int, what: str = "position", where: str | None = None) -> int:
    """One token position (an int, or a spec that selects exactly one)."""
    return _only(positions(spec, length, what, where), spec, what, "position")


def layer_pairs(source_spec: Any, target_spec: Any, n_source: int, n_target: int) -> list[tuple[int, int]]:
    """The (source block, target block) cells of a sweep; `same` pairs each source with itself
    (with the target model's nearest block by depth when the two models differ in depth)."""
    sources = blocks(source_spec, n_source, "sweep.source_layers")
    if isinstance(target_spec, str) and target_spec.strip().lower() == "same":
        if n_source != n_target:
            return [(s, round(s * (n_target - 1) / max(n_source - 1, 1))) for s in sources]
        return [(s, s) for s in sources]
    targets = blocks(target_spec, n_target, "sweep.target_layers")
    return [(s, t) for s in sources for t in targets]


def check_sweep(sweep: Any) -> None:
    """Refuse a bad block spec of a sweep config at once, before any model loads (its range is
    checked against the model later)."""
    for key in ("source_layers", "target_layers"):
        spec = sweep.get(key) if sweep is not None else None
        if spec is not None and not (key == "target_layers" and str(spec).strip().lower() == "same"):
            parse(spec, f"sweep.{key}")
