"""The next-token aggregations the README quotes, on small hand-built frames: precision@1 and
surprisal per (method, ℓ, ℓ*) with standard errors, the overall means, and the best target block ℓ*
per source block that the table prints and the figure draws."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from patchscan.experiments.next_token import NextTokenExperiment


def frame() -> pd.DataFrame:
    """Four texts; token identity on a 2x2 grid (ℓ, ℓ*), the logit lens read at the last block (1)."""
    cells = {
        ("token_identity", 0, 0): ([1, 0, 0, 1], [1.0, 2.0, 3.0, 4.0]),
        ("token_identity", 0, 1): ([1, 1, 1, 0], [2.0, 2.0, 2.0, 2.0]),
        ("token_identity", 1, 0): ([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]),  # ties with ℓ* = 1 at 0.5
        ("token_identity", 1, 1): ([0, 1, 1, 0], [9.0, 9.0, 9.0, 9.0]),
        ("logit_lens", 0, 1): ([0, 0, 0, 1], [3.0, 3.0, 3.0, 3.0]),
        ("logit_lens", 1, 1): ([1, 1, 1, 1], [0.0, 0.0, 0.0, 0.0]),
    }
    rows = [
        {
            "example_id": str(i),
            "method": method,
            "source_layer": s,
            "target_layer": t,
            "precision_at_1": bool(p),
            "surprisal": x,
        }
        for (method, s, t), (hits, surprisals) in cells.items()
        for i, (p, x) in enumerate(zip(hits, surprisals))
    ]
    return pd.DataFrame(rows)


def cell(metrics: dict, method: str, s: int, t: int) -> dict:
    (row,) = [
        r
        for r in metrics["by_layer"]
        if (r["method"], r["source_layer"], r["target_layer"]) == (method, s, t)  # one row per cell
    ]
    return row


def test_precision_and_surprisal_per_cell_with_standard_errors():
    metrics = NextTokenExperiment.metrics(frame(), cfg=None)
    assert metrics["n_examples"] == 4 and len(metrics["by_layer"]) == 6
    first = cell(metrics, "token_identity", 0, 0)
    assert first["precision_at_1"] == 0.5 and first["n"] == 4
    assert first["precision_at_1_se"] == pytest.approx(math.sqrt(1 / 3) / 2)  # std (ddof 1) / sqrt(n)
    assert first["surprisal"] == 2.5 and first["surprisal_se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    flat = cell(metrics, "token_identity", 0, 1)
    assert flat["precision_at_1"] == 0.75 and flat["surprisal_se"] == 0.0
    assert cell(metrics, "logit_lens", 1, 1)["precision_at_1"] == 1.0


def test_overall_means_pool_every_cell_of_a_method():
    overall = {r["method"]: r for r in NextTokenExperiment.metrics(frame(), cfg=None)["overall"]}
    assert overall["token_identity"]["precision_at_1"] == pytest.approx(9 / 16) and overall["token_identity"]["n"] == 16
    assert overall["logit_lens"]["precision_at_1"] == pytest.approx(5 / 8)
    assert overall["logit_lens"]["surprisal"] == pytest.approx(1.5)


def test_best_target_block_is_chosen_by_precision_and_ties_go_to_the_lower_block():
    best = NextTokenExperiment.best_target(NextTokenExperiment.metrics(frame(), cfg=None))
    chosen = {(r.method, r.source_layer): (r.target_layer, r.precision_at_1, r.surprisal) for r in best.itertuples()}
    assert chosen == {
        ("token_identity", 0): (1, 0.75, 2.0),  # the best precision, not the lowest surprisal (ℓ* = 0: 2.5)
        ("token_identity", 1): (0, 0.5, 0.5),  # a tie at 0.5: the lower ℓ*, with its own surprisal
        ("logit_lens", 0): (1, 0.25, 3.0),
        ("logit_lens", 1): (1, 1.0, 0.0),
    }


def test_the_printed_table_holds_the_best_cells():
    lines = NextTokenExperiment.report(NextTokenExperiment.metrics(frame(), cfg=None)).splitlines()
    assert lines[0].startswith("next-token estimation, 4 examples")
    assert lines[1].split() == [
        "method",
        *"logit_lens p@1 token_identity p@1".split(),
        *("logit_lens surprisal token_identity surprisal".split()),
    ]
    by_block = {int(line.split()[0]): [float(v) for v in line.split()[1:]] for line in lines[3:]}
    assert by_block == {0: [0.25, 0.75, 3.0, 2.0], 1: [1.0, 0.5, 0.0, 0.5]}
