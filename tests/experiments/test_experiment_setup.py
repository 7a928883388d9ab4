"""The scopes on the API: one row contract, set-up shared in the base, source positions honoured or
refused, cross-model entity descriptions through AffineMaps (composed configs, in-process)."""

from __future__ import annotations

import pytest
import torch

from patchscan.runs.row_schema import NEXT_TOKEN_COLUMNS, RUN_COLUMNS
from tests.conftest import tiny
from tests.helpers import compose as shared_compose


def compose(*overrides: str):
    return shared_compose("model.device=cpu", *overrides)


def bound(scope_name: str, *overrides: str, model: str = "tiny_llama"):
    from patchscan.experiments import get_experiment

    cfg = compose(f"experiment={scope_name}", f"model={model}", *overrides)
    scope = get_experiment(scope_name)(cfg)
    scope.bind(tiny(model))
    return scope


def test_next_token_rows_follow_the_row_contract():
    scope = bound("next_token", "dataset.limit=2", "methods=[token_identity,logit_lens]", "sweep.source_layers=[1]")
    df = scope.run_chunk(scope.examples(), lambda n: None)
    assert tuple(df.columns) == RUN_COLUMNS + NEXT_TOKEN_COLUMNS
    assert str(df["source_layer"].dtype) == "Int64"
    lens = df[df["method"] == "logit_lens"]
    assert (lens["target_layer"] == 3).all() and lens["target_prompt"].isna().all()


def test_entity_positions_follow_the_sweep():
    last = bound("entity_resolution", "dataset.limit=2", "sweep.source_layers=[0]")
    every = bound("entity_resolution", "dataset.limit=2", "sweep.source_layers=[0]", "sweep.source_positions=all")
    assert [e["example_id"] for e in last.examples()] == ["0", "1"]
    ex = every.examples()
    name_tokens = len(tiny("tiny_llama").encode(ex[0]["name"]))
    first = [e for e in ex if e["name"] == ex[0]["name"]]
    assert [e["position"] for e in first] == list(range(name_tokens))
    assert all(len(e["ids"]) == e["position"] + 1 for e in ex)
    assert last.examples()[0]["position"] == name_tokens - 1


@pytest.mark.parametrize(
    ("experiment", "spec", "message"),
    [
        ("next_token", "all", "next_token takes random, last, one position"),
        ("next_token", "[1,2]", "next_token takes"),
        ("cross_model", "all", "cross_model takes random, last"),
    ],
)
def test_source_positions_that_cannot_apply_are_refused(experiment, spec, message):
    from patchscan.experiments import get_experiment

    cfg = compose(f"experiment={experiment}", "model=tiny_llama", f"sweep.source_positions={spec}")
    with pytest.raises(ValueError, match=message):
        get_experiment(experiment)(cfg)


def test_held_out_split_names_its_key():
    from patchscan.experiments.base import Experiment

    train, rest = Experiment.held_out(list("abcde"), 2, "maps.train_texts")
    assert train == ["d", "e"] and rest == ["a", "b", "c"]
    with pytest.raises(ValueError, match="maps.train_texts=5 leaves no text"):
        Experiment.held_out(list("abcde"), 5, "maps.train_texts")


def test_cross_model_entity_task_maps_states_through_its_affine_maps():
    scope = bound(
        "cross_model",
        "task=entity_description",
        "target_model=tiny_llama_wide",
        "maps.train_texts=40",
        "sweep.source_layers=[1]",
        "sweep.target_layers=[2]",
        "dataset.limit=1",
        "generation.max_new_tokens=3",
        "controls=[source_in_prompt]",
        "similarity.embedding=false",
    )
    entity = scope.entity_scope
    assert "map_state" not in vars(entity) and entity.maps is scope.maps
    h = torch.randn(tiny("tiny_llama").width)
    assert torch.equal(entity.map_state(h, 1, 2), scope.maps[1, 2](h))
    # the swap's input-only control asks the verbalizer M*: the name, then the prompt without its x
    row = scope.run_chunk(scope.examples(), lambda n: None).set_index("method").loc["source_in_prompt"]
    wide = scope.target_view
    assert wide.name == "tiny_llama_wide" and row.target_prompt.startswith(row.subject + "\nSyria: ")
    x = wide.tokenizer(row.target_prompt, return_tensors="pt").input_ids
    out = wide.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                              pad_token_id=wide.tokenizer.pad_token_id)  # fmt: skip
    assert wide.tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True) == row.generation


@pytest.mark.parametrize(
    ("experiment", "extra"),
    [
        ("attribute_extraction", "controls=[zero,bogus]"),
        ("entity_resolution", "controls=[bogus]"),
        ("multihop", "controls=[bogus]"),
        ("cross_model", "task=entity_description"),
    ],
)
def test_an_unknown_control_is_refused_in_one_line(experiment, extra):
    from patchscan.errors import UserError
    from patchscan.experiments import get_experiment
    from tests.helpers import LRE

    data = [f"dataset.path={LRE}"] if experiment in ("attribute_extraction", "multihop") else []
    cross = ["controls=[prompt_only]"] if experiment == "cross_model" else []  # attribute_extraction's own
    cfg = compose(f"experiment={experiment}", "model=tiny_llama", *data, extra, *cross)
    with pytest.raises(UserError) as caught:
        get_experiment(experiment)(cfg)
    message = str(caught.value)
    bad = "prompt_only" if experiment == "cross_model" else "bogus"
    assert "\n" not in message and f"unknown control {bad!r}" in message
    assert "source_in_prompt, zero, mean" in message
