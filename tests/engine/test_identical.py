"""Identical runs are generated once (engine.identical), each row still cut at its own stop."""

from __future__ import annotations

import pytest
import torch

from patchscan.engine import Patch, generate
from patchscan.engine.counting import count_work
from patchscan.engine.decoding import truncate_at_stop
from patchscan.engine.identical import AllStopped, identical_runs, shared_stop
from patchscan.metrics.answers import StopWhenFound
from tests.conftest import tiny
from tests.reference import naive_generate


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_neox"])
def test_duplicate_rows_run_once_and_each_stops_at_its_own_answer(name):
    view = tiny(name)
    torch.manual_seed(0)
    ids = tuple(view.encode("The capital city of x is"))
    vectors = torch.randn(3, view.width, dtype=view.dtype)
    distinct = [Patch(target_ids=ids, target_position=4, target_layer=k, vector=vectors[k]) for k in range(3)]
    distinct.append(Patch(target_ids=ids, target_position=4, target_layer=1, vector=None))  # a baseline
    full = [naive_generate(view, p, 10) for p in distinct]
    # every run asked for three times: its answer after 2 tokens, after 5 tokens, and no stop
    patches, stops, expected = [], [], []
    for p, tokens in zip(distinct, full):
        for stop in (
            StopWhenFound(view.decode(tokens[1:2]) or "?"),
            StopWhenFound(view.decode(tokens[4:5]) or "?"),
            None,
        ):
            copy = Patch(
                target_ids=p.target_ids,
                target_position=p.target_position,
                target_layer=p.target_layer,
                vector=None if p.vector is None else p.vector.clone(),
            )  # equal values, another tensor
            patches.append(copy)
            stops.append(stop)
            expected.append(truncate_at_stop(view, tokens, stop))
    with count_work(view.model) as counts:
        out = generate(view, patches, max_new_tokens=10, stops=stops)
    assert out == expected
    assert counts.tokens_generated == sum(len(t) for t in expected[2::3])  # one full-length run each


def test_runs_differing_in_any_part_stay_apart():
    view = tiny("tiny_llama")
    ids = tuple(view.encode("The capital city of x is"))
    v = torch.randn(view.width)
    w = v.clone()
    w[7] = torch.nextafter(w[7], torch.tensor(float("inf")))  # one float step apart
    base = dict(target_ids=ids, target_position=4, target_layer=1)
    patches = [
        Patch(**base, vector=v),
        Patch(**base, vector=v.clone()),
        Patch(**base, vector=w),
        Patch(**{**base, "target_layer": 2}, vector=v),
        Patch(**{**base, "target_position": 3}, vector=v),
        Patch(**{**base, "target_ids": ids[:-1] + (ids[-1] + 1,)}, vector=v),
        Patch(**base, vector=v.double()),
    ]
    assert identical_runs(patches) == [[0, 1], [2], [3], [4], [5], [6]]


def test_a_shared_stop_holds_when_every_rows_stop_holds():
    a, b = StopWhenFound("Paris"), StopWhenFound("France")
    assert shared_stop([a]) is a and shared_stop([a, None]) is None
    both = shared_stop([a, b])
    assert isinstance(both, AllStopped)
    assert not both("Paris is") and both("Paris is in France")
