"""Shards split the model work (issue 12, point 2): every forward pass runs inside the runner's
chunks, so N shards each do about 1/N of it, and a resume redoes only the missing chunks.

Counts come from results/_shard-SSS.json (patchscan.runs.worklog), written by each shard.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from patchscan.runs.worklog import read_shard_logs
from tests.helpers import LRE, run_in

GRID = ["model=tiny_llama", "sweep.source_layers=[1,3]", "sweep.target_layers=[0,2]", "generation.max_new_tokens=4"]
EXPERIMENTS = {
    # 8 samples; the filled-prompt baseline and the probe's stored states run per chunk
    "attribute_extraction": [
        "experiment=attribute_extraction",
        "dataset.relations=[country_capital_city,fruit_inside_color]",
        "dataset.per_relation_limit=4",
        "runner.examples_per_part=2",
        # shuffled_source runs equal their donor's own runs and are generated once when both sit in one
        # chunk (engine.identical): that work depends on which examples share a chunk, so it is left out
        "controls=[prompt_only,embedding_only]",
    ],
    # 4 two-hop samples, the single-hop filter per chunk (a random model answers no hop: a second run
    # below switches the filter off so that the grid runs too)
    "multihop": [
        "experiment=multihop",
        "dataset.relations=[city_in_country,country_capital_city]",
        "runner.examples_per_part=1",
    ],
}


def run_shards(tmp_path, experiment: str, n: int, *extra: str):
    """The N jobs of `patchscan run -m ... runner.shard=0,..,N-1` (the basic launcher runs them one after
    another in one process; test_cli runs a real multirun), here in this process."""
    results = tmp_path / f"{experiment}-{n}" / "results"
    for shard in range(n):
        run_in(
            tmp_path / f"sweep-{experiment}-{n}" / str(shard),
            *EXPERIMENTS[experiment],
            *GRID,
            f"dataset.path={LRE}",
            *extra,
            f"runner.num_shards={n}",
            f"runner.shard={shard}",
            f"runner.results_dir={results}",
        )
    return results, read_shard_logs(results)


@pytest.fixture
def lre(tmp_path):
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


@pytest.mark.parametrize(
    "experiment,extra",
    [("attribute_extraction", ()), ("multihop", ()), ("multihop", ("multihop.require_single_hops=false",))],
)
def test_shards_split_the_model_work(lre, experiment, extra):
    work = {}
    for n in (1, 2, 4):
        results, logs = run_shards(lre, experiment, n, *extra)
        assert sorted(logs) == list(range(n))
        work[n] = {k: log["totals"] for k, log in logs.items()}
        df = pd.read_parquet(results)
        assert df["example_id"].nunique() == (8 if experiment == "attribute_extraction" else 4)
    print(
        experiment,
        extra,
        json.dumps({n: {k: (t["forward_passes"], t["forward_tokens"]) for k, t in w.items()} for n, w in work.items()}),
    )
    whole = work[1][0]
    assert whole["forward_passes"] > 0 and whole["tokens_generated"] > 0
    for n in (2, 4):
        shards = work[n].values()
        for key in ("forward_tokens", "tokens_generated"):  # the work itself: split, not repeated
            assert abs(sum(t[key] for t in shards) - whole[key]) <= 0.1 * whole[key] + 30 * n
            assert all(t[key] <= whole[key] / n * 1.1 + 30 for t in shards)
        # forward calls: the same per chunk, so about 1/N each (a chunk mixing two relations has one
        # more prefix group than a chunk of one)
        assert sum(t["forward_passes"] for t in shards) <= 1.6 * whole["forward_passes"] + 5 * n
        assert all(t["forward_passes"] <= 1.6 * whole["forward_passes"] / n + 5 for t in shards)
    if experiment == "attribute_extraction":
        df = pd.read_parquet(results)
        assert {"subject_in_prompt", "source_state", "patchscope"} <= set(df["method"])


def test_resume_redoes_only_the_missing_chunk(lre):
    results, logs = run_shards(lre, "attribute_extraction", 2)
    first = logs[1]["sessions"][0]["parts"]
    lost = first[1]
    (results / lost["part"]).unlink()
    run_in(
        lre / "resume",
        *EXPERIMENTS["attribute_extraction"],
        *GRID,
        f"dataset.path={LRE}",
        "runner.num_shards=2",
        "runner.shard=1",
        f"runner.results_dir={results}",
    )
    log = read_shard_logs(results)[1]
    again = log["sessions"][-1]
    assert [p["part"] for p in again["parts"]] == [lost["part"]]
    assert again["examples_skipped"] == sum(p["examples"] for p in first) - lost["examples"]
    for key in ("forward_passes", "forward_tokens", "tokens_generated"):
        assert again["parts"][0][key] == lost[key] and again[key] == lost[key]
    assert log["totals"]["chunks"] == len(first) + 1
    assert read_shard_logs(results)[0]["totals"] == logs[0]["totals"]  # the other shard's log is untouched
    assert pd.read_parquet(results)["example_id"].nunique() == 8
