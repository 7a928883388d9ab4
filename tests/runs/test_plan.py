"""Plan before you spend (issue 12, point 5): a dry run prints what a config will do without
loading weights, and its counts equal what a real run records, for every experiment (issue 26: the
dry run is the engine's own scheduler with a counting backend)."""

from __future__ import annotations

import json

import pytest

from patchscan.experiments import get_experiment
from patchscan.runs.dry_run import make_plan
from patchscan.runs.worklog import read_shard_logs
from tests.helpers import LRE, cli_here, compose, run_in

LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 40,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
CASES = {
    "next_token": [
        "+experiment=next_token",
        "model=tiny_llama",
        "dataset.limit=6",
        "affine_lens.train_texts=40",
        "runner.examples_per_part=4",
    ],
    "attribute_extraction": [
        "+experiment=attribute_extraction",
        "generation.stop_when_correct=false",  # stops make the plan an upper bound; without them it is exact
        "model=tiny_llama",
        f"dataset.path={LRE}",
        "dataset.relations=[country_capital_city,fruit_inside_color]",
        "dataset.per_relation_limit=4",
        "sweep.source_layers=[1,3]",
        "sweep.target_layers=[0,2]",
        "generation.max_new_tokens=4",
        "runner.examples_per_part=3",
        "controls=[prompt_only,embedding_only,shuffled_source,source_in_prompt,zero,mean]",
    ],
    "entity_resolution": [
        "+experiment=entity_resolution",
        "generation.stop_when_correct=false",
        "model=tiny_neox",
        "dataset.limit=3",
        "sweep.source_layers=[0,3]",
        "generation.max_new_tokens=8",
        "runner.examples_per_part=2",
        "controls=[source_in_prompt,zero,mean]",  # the shared controls: their rows counted too
    ],
    "multihop": [
        "+experiment=multihop",
        "generation.stop_when_correct=false",
        "model=tiny_llama",
        f"dataset.path={LRE}",
        "dataset.relations=[city_in_country,country_capital_city]",
        "multihop.require_single_hops=false",  # the filter makes the plan an upper bound: without it, exact
        "multihop.per_pair_limit=2",
        "sweep.source_layers=[1,3]",
        "sweep.target_layers=[0,2]",
        "generation.max_new_tokens=4",
        "runner.examples_per_part=3",
        "controls=[source_in_prompt,zero,mean]",  # the shared controls: their rows counted too
    ],
    "superscopes": [
        "+experiment=superscopes",
        "model=tiny_llama",
        "dataset.limit=3",
        "sweep.source_layers=1:3",
        "superscopes.alphas=[1,3,6]",
        "generation.max_new_tokens=4",
        "runner.examples_per_part=2",
    ],
    "cross_model": [
        "+experiment=cross_model",
        "model=tiny_llama",
        "target_model=tiny_llama_wide",
        "dataset.limit=5",
        "maps.train_texts=60",
        "sweep.source_layers=[0,3]",
        "sweep.target_layers=[1,5]",
        "runner.examples_per_part=2",
    ],
    "cross_model_entity": [
        "+experiment=cross_model",
        "task=entity_description",
        "generation.stop_when_correct=false",
        "model=tiny_llama",
        "target_model=tiny_llama_wide",
        "dataset.limit=3",
        "maps.train_texts=60",
        "sweep.source_layers=[3]",
        "sweep.target_layers=[5]",
        "generation.max_new_tokens=5",
        "dataset=builtin_texts",
        "runner.examples_per_part=2",
        "controls=[source_in_prompt,zero,mean]",  # the shared controls: their rows counted too
    ],
}


def plan_in_process(overrides: list[str]):
    cfg = compose(*overrides)
    return make_plan(cfg, get_experiment(cfg.experiment.name)(cfg))


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test. The built-in model's one-time conversion into the
    model cache (which tiny models need for their tokenizer) happens first: it is set-up, not planning."""
    import transformers
    from transformers import modeling_utils

    from patchscan.models.loading import builtin_folder

    builtin_folder()

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("patchscan.models.loading.load_model", refuse)


@pytest.mark.parametrize("experiment", sorted(CASES))
def test_plan_counts_equal_the_real_run(tmp_path, monkeypatch, no_weights, experiment):
    plan = plan_in_process(CASES[experiment])
    monkeypatch.undo()  # weights from here on: the real run
    run = run_in(tmp_path / "run", *CASES[experiment])
    real = read_shard_logs(run / "results")[0]["totals"]
    import pandas as pd

    df = pd.read_parquet(run / "results")
    patched = df[df["target_layer"].notna() & ~df["method"].isin(["logit_lens", "affine_lens"])]
    assert plan.examples == real["examples"] == df["example_id"].nunique()
    assert plan.chunks == real["chunks"]
    assert plan.cells == len(patched)
    assert plan.counts.forward_passes == real["forward_passes"]
    assert plan.counts.forward_tokens == real["forward_tokens"]
    assert plan.counts.tokens_generated == real["tokens_generated"]


def test_plan_command_on_tiny_and_builtin_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("tiny_llama", "smollm2_135m"):
        proc = cli_here(
            "plan", "+experiment=next_token", f"model={model}", "dataset.limit=20", "methods=[token_identity]"
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "forward passes:" in out and "no weights loaded" in out
        assert "cells (patched runs): " + str(20 * (4 if model == "tiny_llama" else 30)) in out
    assert not list(tmp_path.iterdir()), "a plan writes no run dir"


def test_plan_builtin_loads_no_weights(no_weights):
    plan = plan_in_process(
        [
            "+experiment=attribute_extraction",
            "model=smollm2_135m",
            f"dataset.path={LRE}",
            "dataset.relations=[country_capital_city]",
        ]
    )
    assert 134e6 < plan.n_parameters < 136e6 and plan.weight_bytes == 4 * plan.n_parameters
    # the grid, shuffled_source, zero and mean on the same grid, embedding_only at each of the 10 target blocks
    assert plan.examples == 5 and plan.cells == 5 * (4 * 10 * 10 + 10) and plan.counts.forward_passes > 0


@pytest.mark.parametrize("dtype", [(), ("model.dtype=auto",)])  # auto: bf16 on a GPU, as load_model resolves it
def test_plan_13b_from_its_config_alone(tmp_path, dtype):
    config = tmp_path / "llama2-13b" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA2_13B))
    proc = cli_here(
        "plan",
        "experiment=attribute_extraction",
        "model=llama2_13b",
        f"model.config_path={config}",
        "model.device=cuda",
        *dtype,
        f"dataset.path={LRE}",
        "runner.memory_budget_gb=null",
        "runner.gpu_memory_gb=80",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    print(out)
    assert "13.016 B parameters" in out and "bfloat16 on cuda" in out
    assert "stand-in" in out  # no tokenizer beside the config
    peak = float(out.split("peak memory:")[1].split("GiB")[0])
    weights = float(out.split("GiB = ")[1].split(" GiB weights")[0])
    assert 24.0 < weights < 24.5  # 13.0e9 parameters x 2 bytes = 26 GB = 24.2 GiB
    assert weights < peak < 0.8 * 80


def test_plan_filters_keep_every_example(no_weights):
    """The filters (multihop's single hops, attribute_extraction's `filter`) are counted as if every example
    passed: the plan with a filter counts the unfiltered plan's cells and more work (the filter's own)."""
    hops = [o for o in CASES["multihop"] if not o.startswith("multihop.require_single_hops")]
    cases = [
        (CASES["multihop"], [*hops, "multihop.require_single_hops=true"]),
        ([*CASES["attribute_extraction"], "filter=false"], [*CASES["attribute_extraction"], "filter=true"]),
    ]
    for without, with_filter in cases:
        a, b = plan_in_process(without), plan_in_process(with_filter)
        assert b.cells == a.cells > 0 and b.counts.forward_passes >= a.counts.forward_passes
        assert "assumes every example passes the filter" in " ".join(b.notes)
