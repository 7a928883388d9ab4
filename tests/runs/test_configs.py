"""The Hydra configs compose to what they did before they inherited (model bases, a generation group,
an `experiment` slot), whichever way the experiment is named, and keys that cannot apply are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from patchscan.cli.main import check_group_choices, compose_config
from patchscan.errors import UserError
from patchscan.runs.config_checks import validate

EXPECTED = json.loads((Path(__file__).parents[1] / "fixtures" / "composed_configs.json").read_text())
EXPERIMENTS = [e for e in EXPECTED["experiments"] if e]
MODELS = list(EXPECTED["models"])


def flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def composed(*overrides: str) -> dict:
    return flat(OmegaConf.to_container(compose_config(list(overrides)), resolve=False))


def expected(experiment: str, model: str, target_model: str = "smollm2_135m") -> dict:
    out = dict(EXPECTED["experiments"][experiment])
    out.update({f"model.{k}": v for k, v in flat(EXPECTED["models"][model]).items()})
    if experiment == "cross_model":
        out.update({f"target_model.{k}": v for k, v in flat(EXPECTED["models"][target_model]).items()})
    return out


def _diff(a: dict, b: dict) -> list:
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_as_before_with_every_model(experiment):
    for model in MODELS:
        got = composed(f"experiment={experiment}", f"model={model}")
        assert not _diff(got, expected(experiment, model)), (experiment, model, _diff(got, expected(experiment, model)))
    assert composed(f"+experiment={experiment}", "model=tiny_llama") == composed(
        f"experiment={experiment}", "model=tiny_llama"
    )


def test_no_experiment_composes_the_root_and_the_run_asks_for_one():
    assert not _diff(composed(), expected("", "smollm2_135m"))
    assert composed()["experiment.name"] == "???"


def test_target_model_inherits_like_model():
    got = composed("experiment=cross_model", "model=tiny_llama", "target_model=tiny_llama_wide")
    assert not _diff(got, expected("cross_model", "tiny_llama", "tiny_llama_wide"))


def test_generation_group_is_chosen_by_the_experiment_and_overridable():
    assert composed("experiment=entity_resolution")["generation.max_new_tokens"] == 50
    assert composed("experiment=multihop")["generation.case_sensitive"] is True
    assert not any(k.startswith("generation.") for k in composed("experiment=next_token"))
    swapped = composed("experiment=attribute_extraction", "generation=description", "generation.max_new_tokens=7")
    assert swapped["generation.max_new_tokens"] == 7 and "generation.case_sensitive" not in swapped


def test_model_bases_are_not_offered_as_models():
    with pytest.raises(UserError, match="unknown model '_hub'"):
        check_group_choices(["model=_hub"])
    with pytest.raises(UserError) as err:
        check_group_choices(["model=nope"])
    assert "_tiny" not in str(err.value) and "tiny_llama" in str(err.value)


@pytest.mark.parametrize("experiment", ["attribute_extraction", "multihop"])
def test_source_positions_is_refused_where_the_experiment_reads_its_own(experiment):
    validate(compose_config([f"experiment={experiment}"]))  # the experiment's own default passes
    for value in ("all", "random", "[0,-1]", "3"):
        cfg = compose_config([f"experiment={experiment}", f"sweep.source_positions={value}"])
        with pytest.raises(UserError, match=rf"^sweep.source_positions=.* does not apply to {experiment}.*=last$"):
            validate(cfg)


@pytest.mark.parametrize(
    "experiment,honoured,refused",
    [
        ("next_token", ("random", "last", "[-2]"), ("all", "[0,1]")),
        ("entity_resolution", ("last", "random", "all", "[0,-1]"), ("bogus",)),
        ("cross_model", ("random", "last"), ("all", "[0,1]")),
    ],
)
def test_source_positions_is_left_to_the_scopes_that_honour_it(experiment, honoured, refused):
    """The schema passes every value on; the scope's own check (before any model loads) refuses."""
    from patchscan.experiments import get_experiment

    for value in honoured + refused:
        cfg = compose_config([f"experiment={experiment}", f"sweep.source_positions={value}"])
        validate(cfg)
        if value in refused:
            with pytest.raises(UserError, match="sweep.source_positions"):
                get_experiment(experiment)(cfg)


def test_model_config_gives_a_model_with_its_inherited_keys():
    from patchscan.paths import model_config

    tiny = model_config("tiny_llama")
    assert tiny["source"] == "tiny" and tiny["arch"] == "llama" and tiny["dtype"] == "float32"
    hub = model_config("vicuna_7b")
    assert hub["source"] == "hub" and hub["id"] == "lmsys/vicuna-7b-v1.5" and hub["device_map"] == "auto"
    with pytest.raises(UserError, match="unknown model 'no_such_model'"):
        model_config("no_such_model")


def test_the_one_model_config_composer_gives_what_a_run_gets():
    """paths.model_config (what `ps.load_model(NAME)` loads) equals Hydra's `model=NAME`, for every model config."""
    from patchscan.paths import model_config, option_names

    for name in option_names("model"):
        assert model_config(name) == OmegaConf.to_container(compose_config([f"model={name}"]).model), name


def test_a_similarity_threshold_is_a_cosine():
    validate(compose_config(["experiment=superscopes", "superscopes.threshold=-1"]))
    for value in ("5", "1.5", "-2"):
        cfg = compose_config(["experiment=superscopes", f"superscopes.threshold={value}"])
        with pytest.raises(UserError, match=r"superscopes.threshold=.* a number from -1 to 1"):
            validate(cfg)
