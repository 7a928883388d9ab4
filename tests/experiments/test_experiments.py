"""Attribute extraction and entity resolution end to end on tiny models, and their helpers."""

from __future__ import annotations

import json

import pandas as pd

from patchscan.engine import Patch, capture
from patchscan.experiments.entities import first_description
from patchscan.metrics.similarity import embedding_cosine, rouge_l
from patchscan.metrics.text import contains_answer
from tests.conftest import tiny
from tests.helpers import LRE, run_in
from tests.reference import naive_generate


def run_on_fixture_relations(tmp_path, experiment: str, relations: str, *overrides: str):
    """tiny_llama runs `experiment` on the fixture relations, source blocks 1 and 3, target blocks 0 and 2."""
    run = run_in(
        tmp_path / "run",
        f"experiment={experiment}",
        "model=tiny_llama",
        f"dataset.path={LRE}",
        f"dataset.relations=[{relations}]",
        "sweep.source_layers=[1,3]",
        "sweep.target_layers=[0,2]",
        *overrides,
    )
    return run, pd.read_parquet(run / "results")


def test_contains_answer_ignores_spaces_and_respects_case():
    assert contains_answer(" is Washington D. C.", "Washington D.C.")
    assert not contains_answer("paris is nice", "Paris")
    assert contains_answer("paris is nice", "Paris", case_sensitive=False)


def test_first_description_and_similarity():
    assert first_description(": German composer and pianist, Paris: Capital of France") == "German composer and pianist"
    assert first_description(" Capital of France\nmore") == "Capital of France"
    assert rouge_l(["capital city of France"], ["capital city of France"]) == [1.0]
    close, far = embedding_cosine(["capital of France", "a red fruit"], ["the capital city of France"] * 2)
    assert close > 0.7 and far < close


def test_attribute_extraction_rows_rerun_alone(tmp_path):
    run, df = run_on_fixture_relations(
        tmp_path,
        "attribute_extraction",
        "country_capital_city,fruit_inside_color",
        "dataset.per_relation_limit=4",
        "generation.max_new_tokens=6",
    )
    patch = df[df["method"] == "patchscope"]
    # on by default (test_tables.py checks them)
    controls = {"prompt_only", "embedding_only", "shuffled_source", "source_in_prompt", "zero", "mean"}
    assert (
        len(patch) == 8 * 2 * 2 and set(df["method"]) == {"patchscope", "subject_in_prompt", "source_state"} | controls
    )
    assert len(df[df["method"] == "source_state"]) == 8 * 2 and len(df[df["method"] == "subject_in_prompt"]) == 8
    assert all(str(df[c].dtype) == "Int64" for c in ("source_layer", "target_layer", "target_position"))
    assert all(patch["correct"] == [contains_answer(g, o) for g, o in zip(patch["generation"], patch["object"])])
    view = tiny("tiny_llama")
    for _, row in patch.sample(4, random_state=0).iterrows():  # every row carries what it needs to re-run it
        state = capture(view, [list(row.source_token_ids)], [int(row.source_layer)], [[int(row.source_position)]])
        patch_ = Patch(
            target_ids=tuple(row.target_token_ids),
            target_position=int(row.target_position),
            target_layer=int(row.target_layer),
            vector=state[0].states[0, 0],
        )
        assert view.decode(naive_generate(view, patch_, 6)) == row.generation
    # a shuffled_source run is its donor's own Patchscope run (generated once: engine.identical),
    # each cut at its own answer
    keys = ["source_text", "source_layer", "target_layer", "target_prompt"]
    own = patch.set_index(keys)["generation"].to_dict()
    shuffled = df[df["method"] == "shuffled_source"]
    assert len(shuffled) and all(
        g.startswith(own[k]) or own[k].startswith(g)
        for k, g in zip(map(tuple, shuffled[keys].values), shuffled["generation"])
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert {t["task"] for t in metrics["tasks"]} == {"country_capital_city", "fruit_inside_color"}
    assert all(t["probe_mean"] == t["probe_mean"] for t in metrics["tasks"])  # fitted from the stored states
    assert (run / "attribute_heatmap.png").exists()


def test_unseen_relation_file_and_tsv_run_without_code_change(tmp_path):
    relation = {
        "name": "animal sound",
        "prompt_templates": ["The sound a {} makes is"],
        "prompt_templates_zs": ["{} makes the sound"],
        "properties": {},
        "samples": [
            {"subject": s, "object": o}
            for s, o in [("dog", "bark"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack")]
        ],
    }
    (tmp_path / "animal_sound.json").write_text(json.dumps(relation))
    run = run_in(
        tmp_path / "run",
        "experiment=attribute_extraction",
        "model=tiny_gpt2",
        f"dataset.path={tmp_path / 'animal_sound.json'}",
        "sweep.source_layers=[0]",
        "sweep.target_layers=[1]",
        "generation.max_new_tokens=4",
        "source.kind=template",
    )
    df = pd.read_parquet(run / "results").query("method == 'patchscope'")
    assert set(df["relation"]) == {"animal_sound"}
    assert df["target_prompt"].iloc[0] == "The sound a x"  # derived from the template with text before {}
    assert df["source_text"].iloc[0] == "The sound a dog makes is"
    tsv = tmp_path / "capitals.tsv"
    tsv.write_text(  # the released files' layout: an unnamed index, sample_id repeated per source snippet
        "\tsample_id\tprompt_target\tposition_target\tobject\tsubject\tprompt_source\tposition_source\n"
        "0\t0\tThe capital city of x\t-1\tParis\tFrance\t trains from Spain to France\t4\n"
        "1\t0\tThe capital city of x\t-1\tParis\tFrance\t\t0\n"
        '2\t1\tThe capital city of x\t-1\tRome\tItaly\t" wine from Italy"\t2\n'
    )
    run2 = run_in(
        tmp_path / "run2",
        "experiment=attribute_extraction",
        "model=tiny_gpt2",
        f"dataset.tsv={tsv}",
        "probe.enabled=false",
        "sweep.source_layers=[0]",
        "sweep.target_layers=[1]",
        "generation.max_new_tokens=4",
    )
    df2 = pd.read_parquet(run2 / "results").query("method == 'patchscope'")
    assert sorted(df2["subject"]) == ["France", "France", "Italy"] and df2["example_id"].nunique() == 3
    assert sorted(df2["source_text"]) == [" trains from Spain to France", " wine from Italy", "France"]


def test_entity_resolution_scores_and_plot(tmp_path):
    run = run_in(
        tmp_path / "run",
        "experiment=entity_resolution",
        "model=tiny_neox",
        "dataset.limit=3",
        "sweep.source_layers=[0,3]",
        "generation.max_new_tokens=8",
    )
    df = pd.read_parquet(run / "results")
    default_controls = {"zero": 6, "mean": 6, "source_in_prompt": 3}  # one source_in_prompt row per entity
    assert df.groupby("method").size().to_dict() == {"patchscope": 6, **default_controls}
    assert (df["source_layer"] == df["target_layer"]).all()
    assert df["rouge_l"].between(0, 1).all() and df["embedding_cosine"].between(-1, 1).all()
    assert {"subject", "object", "generation", "description", "popularity"} <= set(df.columns)
    assert (run / "entity_similarity.png").exists()


def test_cross_model_between_models_of_different_widths(tmp_path):
    run = run_in(
        tmp_path / "run",
        "experiment=cross_model",
        "model=tiny_llama",
        "target_model=tiny_llama_wide",
        "dataset.limit=5",
        "maps.train_texts=60",
        "sweep.source_layers=[0,3]",
        "sweep.target_layers=[1,5]",
    )
    df = pd.read_parquet(run / "results")
    assert set(df["model"]) == {"tiny_llama"} and set(df["target_model"]) == {"tiny_llama_wide"}
    assert len(df) == 5 * 4 and set(df["target_layer"]) == {1, 5}
    assert (run / "cross_model_heatmap.png").exists()
    run2 = run_in(
        tmp_path / "run2",
        "experiment=cross_model",
        "task=entity_description",
        "model=tiny_llama",
        "target_model=tiny_llama_wide",
        "dataset.limit=2",
        "maps.train_texts=60",
        "sweep.source_layers=[3]",
        "sweep.target_layers=[5]",
        "generation.max_new_tokens=5",
        "dataset=builtin_texts",
    )
    assert "rouge_l" in pd.read_parquet(run2 / "results")


def test_cross_model_maps_recover_the_same_model(tmp_path, monkeypatch):
    """Mapping a model onto itself, block to same block, must give back its own predictions."""
    from patchscan.data.texts import load_texts
    from patchscan.engine import patched_next_token
    from patchscan.engine.alignment import fit_cross_model_maps

    view = tiny("tiny_gpt2")
    texts = load_texts({"kind": "builtin", "name": "texts"})
    maps = fit_cross_model_maps(view, view, texts[:120], [(2, 2)], tmp_path, ridge=0.0)
    ids = view.encode(texts[200])
    cap = capture(view, [ids], [2], [[-1]], with_logprobs=True)[0]
    top = patched_next_token(
        view,
        [Patch(target_ids=tuple(ids), target_position=-1, target_layer=2, vector=maps[(2, 2)](cap.states[0, 0]))],
        top_k=1,
    )
    assert int(top.ids[0, 0]) == int(cap.logprobs[0].argmax())


def test_multihop_methods_and_directions(tmp_path):
    run, df = run_on_fixture_relations(
        tmp_path,
        "multihop",
        "city_in_country,country_capital_city",
        "multihop.require_single_hops=false",
        "multihop.per_pair_limit=2",
        "generation.max_new_tokens=4",
    )
    grid = {"patchscope", "patchscope_code", "patchscope_cot", "backpatch"}
    assert set(df["method"]) == {"vanilla", "cot", "source_in_prompt"} | grid  # source_in_prompt: on by default
    sip = df[df["method"] == "source_in_prompt"]
    assert len(sip) == df["example_id"].nunique() and sip["target_layer"].isna().all()
    assert sip["target_prompt"].str.endswith(" is located\nThe capital city of").all()
    assert str(df["source_layer"].dtype) == "Int64" and str(df["target_layer"].dtype) == "Int64"
    back = df[df["method"] == "backpatch"]
    assert (back["target_layer"] < back["source_layer"]).all()
    ps = df[df["method"] == "patchscope"].iloc[0]
    assert ps["target_prompt"] == "The capital city of x" and "the country where" in ps["source_text"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["overall"]["n"] == df["example_id"].nunique() > 0
