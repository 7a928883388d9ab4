"""Superscopes end to end on a tiny model: its rows against a plain hook (tests/reference.py), the
auto-α choice and metrics recomputed from the rows, and the refusals of bad settings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from patchscan.errors import UserError
from patchscan.experiments import get_experiment
from patchscan.metrics.similarity import embedding_cosine
from patchscan.runs.row_schema import RUN_COLUMNS
from tests.conftest import tiny
from tests.helpers import compose, run_in
from tests.reference import naive_generate

OVERRIDES = [
    "+experiment=superscopes",
    "model=tiny_llama",
    "dataset.limit=2",
    "sweep.source_layers=[1]",
    "superscopes.sites=[mlp_out,resid_post]",
    "superscopes.alphas=[1,3,9]",
]


@torch.no_grad()
def _mlp_output(view, ids: list[int], layer: int, position: int) -> torch.Tensor:
    """The MLP output of block `layer` at `position`, read by a hook of its own on the HF module."""
    store = {}

    def hook(module, inputs, output):
        store["h"] = output[0, position].clone()

    handle = view.blocks[layer].mlp.register_forward_hook(hook)
    try:
        view.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return store["h"]


def test_superscopes_rows_equal_a_plain_hook_and_metrics_recompute(tmp_path):
    run = run_in(tmp_path / "run", *OVERRIDES)
    rows = pd.read_parquet(run / "results")
    assert rows["method"].value_counts().to_dict() == {
        "superscopes": 2 * 2 * 3,  # entities × sites × α, at block 1
        "mean": 2 * 2 * 3,
        "zero": 2 * 2,  # α changes no zero vector: one a site
        "source_in_prompt": 2,
    }
    _check_controls(rows)
    df = rows[rows["method"] == "superscopes"]
    assert tuple(df.columns[: len(RUN_COLUMNS)]) == RUN_COLUMNS
    assert {"subject", "object", "alpha", "generation", "similarity", "auto_alpha_chosen"} <= set(df.columns)
    assert sorted(df["source_site"].unique()) == ["mlp_out", "resid_post"] and (df["target_site"] == "resid_post").all()
    assert (df["source_layer"] == df["target_layer"]).all() and list(df["subject"][:1]) == ["Pink Floyd"]

    # one row, by hand: 3 × the MLP output of block 1 at the name's last token, written into block 1's output at x
    view = tiny("tiny_llama")
    row = df.query("source_site == 'mlp_out' and alpha == 3 and source_layer == 1 and example_id == '0'").iloc[0]
    ids, position = [int(t) for t in row["source_token_ids"]], int(row["source_position"])
    assert position == len(ids) - 1 and view.decode(ids) == "Pink Floyd"
    patch = SimpleNamespace(
        target_ids=row["target_token_ids"],
        target_position=row["target_position"],
        target_layer=1,
        vector=3 * _mlp_output(view, ids, 1, position),
    )
    assert view.decode(naive_generate(view, patch, max_new_tokens=10)) == row["generation"]
    assert row["similarity"] == pytest.approx(embedding_cosine([row["generation"]], ["Pink Floyd"])[0], abs=1e-5)

    # auto-α: one row per (entity, site, block), the α ≠ 1 of highest similarity
    cell = ["example_id", "source_site", "source_layer"]
    chosen = df[df["auto_alpha_chosen"]]
    assert (chosen["alpha"] != 1).all() and len(chosen) == len(df.groupby(cell))
    best = df[df["alpha"] != 1].groupby(cell)["similarity"].max()
    assert chosen.set_index(cell)["similarity"].sort_index().equals(best.sort_index())

    metrics = json.loads((run / "metrics.json").read_text())
    plain = rows[rows["method"] == "source_in_prompt"]
    assert metrics["source_in_prompt"] == (plain["similarity"] > 0.3).mean()
    wanted = df.assign(win=df["similarity"] > 0.3).groupby([*cell, df["alpha"] == 1])["win"].any()
    for cell_metrics in metrics["success"]:
        at = wanted.xs((cell_metrics["source_site"], cell_metrics["source_layer"]), level=[1, 2])
        assert cell_metrics["alpha_1"] == at.xs(True, level=1).mean()
        assert cell_metrics["auto_alpha"] == at.xs(False, level=1).mean()
        assert cell_metrics["n"] == 2
    assert (run / "superscopes_success.png").exists()


def _check_controls(rows: pd.DataFrame) -> None:
    """zero, mean and source_in_prompt rows against plain references (own hooks, HF generate)."""
    view = tiny("tiny_llama")
    names = ["Pink Floyd", "Led Zeppelin"]
    mean = sum(_mlp_output(view, view.encode(n), 1, len(view.encode(n)) - 1) for n in names) / 2
    for method, vector in (("mean", 9 * mean), ("zero", torch.zeros(view.width))):
        alpha = 9 if method == "mean" else 1
        row = rows.query(f"method == '{method}' and source_site == 'mlp_out' and alpha == {alpha}").iloc[1]
        patch = SimpleNamespace(
            target_ids=row["target_token_ids"], target_position=row["target_position"], target_layer=1, vector=vector
        )
        assert view.decode(naive_generate(view, patch, max_new_tokens=10)) == row["generation"], method
    row = rows[rows["method"] == "source_in_prompt"].iloc[0]
    text = "Pink Floyd\n" + row["target_prompt"].split("\n", 1)[1]
    assert row["target_prompt"] == text and not text.rstrip().endswith("x")
    plain = SimpleNamespace(target_ids=view.encode(text), target_position=-1, target_layer=0, vector=None)
    assert view.decode(naive_generate(view, plain, max_new_tokens=10)) == row["generation"]  # HF generate, no hook


@pytest.mark.parametrize(
    "override, message",
    [
        ("superscopes.sites=[mlp_out,mlp_output]", "superscopes.sites: unknown site 'mlp_output'; sites: resid_post"),
        ("superscopes.alphas=[3,6]", "superscopes.alphas=[3, 6] has no 1"),
        ("superscopes.alphas=[1,inf]", "superscopes.alphas=[1, inf] is not valid; use a list of finite numbers"),
        ("controls=zero", "controls='zero' is not a list; use controls=[source_in_prompt, zero, mean]"),
        ("controls=[zero,zero]", "controls names 'zero' twice; name each control once"),
        ("superscopes.target_layer=5", "superscopes.target_layer=5 is not valid; use same"),
    ],
)
def test_bad_settings_are_refused_before_a_model_loads(override, message):
    cfg = compose(*OVERRIDES, override)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        get_experiment("superscopes")(cfg)
    assert "\n" not in str(refused.value)
