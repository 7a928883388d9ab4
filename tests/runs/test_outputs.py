"""Outputs a user can trust: strict JSON, integer block columns, plots, plain logs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from patchscan.runs import parts, runner
from tests.helpers import compose
from tests.runs.shared import FakeExperiment, fake_chunk, meta_of

# ---------------------------------------------------------------- one shared small run


def test_metrics_are_strict_json_and_layer_columns_are_integers(tmp_path):
    cfg = compose("+experiment=next_token")
    examples = [{"example_id": str(i), "ids": [i]} for i in range(3)]
    plan = runner.plan_run(runner.open_run(cfg, tmp_path / "run"), examples, meta_of(cfg))
    runner.execute(plan, fake_chunk, 2, "test")
    metrics = runner.finalize(FakeExperiment, cfg, plan.run_dir, plan.results_dir)
    plan.release()
    text = (tmp_path / "run" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert metrics["complete"] is True and json.loads(text)["undefined"] is None
    df = parts.read_results(plan.results_dir)
    from patchscan.runs.row_schema import INDEX_COLUMNS

    for column in INDEX_COLUMNS:
        assert str(df[column].dtype) == "Int64", column
    assert df["target_layer"].isna().sum() == 3 and df["source_position"].eq(1).all()


def test_next_token_plot_draws_what_its_table_prints(monkeypatch):
    from patchscan.experiments.next_token import NextTokenExperiment
    from patchscan.plots import curves

    by_layer = [
        {
            "method": "token_identity",
            "source_layer": s,
            "target_layer": t,
            "precision_at_1": (s + t) % 3 / 2,
            "surprisal": 1.0,
            "n": 4,
        }
        for s in range(3)
        for t in range(3)
    ]
    by_layer += [
        {
            "method": "logit_lens",
            "source_layer": s,
            "target_layer": 2,
            "precision_at_1": s / 4,
            "surprisal": 2.0,
            "n": 4,
        }
        for s in range(3)
    ]
    metrics = {"by_layer": by_layer, "n_examples": 4}
    drawn = {}
    monkeypatch.setattr(curves, "method_curves", lambda by, *a, **k: drawn.setdefault("by", by))
    NextTokenExperiment.plot(pd.DataFrame(), metrics, Path("/nonexistent"))
    table = NextTokenExperiment.report(metrics)
    plotted = drawn["by"].pivot(index="source_layer", columns="method", values="precision_at_1")
    assert len(drawn["by"]) == 6 and plotted.loc[0, "token_identity"] == 1.0  # best target block, not ℓ* = ℓ only
    assert "1.000" in table.splitlines()[3]
    title = curves.wrapped("precision@1: a-very-long-model-name-from-a-local-folder ℓ -> another-long-name ℓ*", 4)
    assert all(len(line) <= 43 for line in title.splitlines())


def test_progress_in_a_log_file_is_plain_lines(base):
    err = base["stderr"]
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("next_token:")]
    assert lines and lines[-1].startswith("next_token: 6/6 examples") and len(lines) == len(set(lines))
