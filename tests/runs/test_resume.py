"""Resume keyed by content: maps, data, parts and repairs (from test_faults)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from patchscan.errors import UserError
from patchscan.runs import runner
from tests.helpers import cli, cli_here, compose, one_line_error, rows, run_in
from tests.runs.shared import copy_run, fake_chunk, meta_of

# ---------------------------------------------------------------- one shared small run


def test_affine_lens_maps_of_one_model_are_never_reused_for_another(tmp_path, monkeypatch):
    """Case 1: maps fitted for model.seed=0 are not handed to model.seed=1 (warm cache == empty cache)."""
    from patchscan.experiments.next_token import NextTokenExperiment
    from patchscan.models import load_model

    def maps(seed: int, cache: Path):
        monkeypatch.setenv("PATCHSCAN_CACHE", str(cache))
        cfg = compose(
            "+experiment=next_token",
            "model=tiny_llama",
            f"model.seed={seed}",
            "dataset.limit=4",
            "affine_lens.train_texts=40",
            "model.device=cpu",
        )
        scope = NextTokenExperiment(cfg)
        scope.bind(load_model(cfg.model))
        return scope.maps

    warm = tmp_path / "warm"
    seed0 = maps(0, warm)
    seed1_warm = maps(1, warm)
    seed1_empty = maps(1, tmp_path / "empty")
    for layer in seed0:
        if layer < 3:  # block 3 is the last: its map is the identity for every model
            assert (seed0[layer].weight - seed1_warm[layer].weight).abs().max() > 1e-3
        assert (seed1_warm[layer].weight - seed1_empty[layer].weight).abs().max() < 1e-5
    assert len(list((warm / "maps").rglob("affine-lens-*"))) == 2


def test_cross_model_maps_are_keyed_by_both_models_weights(tmp_path):
    """Case 1 (cross_model): another source model (seed, width) under the same name gets its own maps."""
    from patchscan.data.texts import load_texts
    from patchscan.engine.alignment import fit_cross_model_maps
    from patchscan.models import load_model
    from patchscan.models.fingerprints import model_fingerprint

    texts = load_texts({"kind": "builtin", "name": "texts"})[:40]
    a = load_model({"source": "tiny", "arch": "llama", "name": "tiny_llama", "seed": 0, "device": "cpu"})
    b = load_model({"source": "tiny", "arch": "llama", "name": "tiny_llama", "seed": 1, "device": "cpu"})
    wide = load_model(
        {
            "source": "tiny",
            "arch": "llama",
            "name": "tiny_llama",
            "device": "cpu",
            "config": {"hidden_size": 96, "num_hidden_layers": 6},
        }
    )
    assert len({model_fingerprint(a), model_fingerprint(b), model_fingerprint(wide)}) == 3
    warm = fit_cross_model_maps(a, a, texts, [(1, 2)], tmp_path / "warm", ridge=0.01)
    other = fit_cross_model_maps(b, a, texts, [(1, 2)], tmp_path / "warm", ridge=0.01)
    fresh = fit_cross_model_maps(b, a, texts, [(1, 2)], tmp_path / "fresh", ridge=0.01)
    assert (other[(1, 2)].weight - fresh[(1, 2)].weight).abs().max() < 1e-5
    assert (other[(1, 2)].weight - warm[(1, 2)].weight).abs().max() > 1e-3
    wide_maps = fit_cross_model_maps(wide, a, texts, [(1, 2)], tmp_path / "warm", ridge=0.01)  # crashed before
    assert wide_maps[(1, 2)].weight.shape == (96, 64)


def test_eval_of_a_results_dir_writes_beside_it_and_runs_twice(base, tmp_path):
    """Case 2: `patchscan eval DIR/results` leaves the Parquet folder readable; a second eval works."""
    run = copy_run(base, tmp_path / "run")
    (run / "metrics.json").unlink()
    for _ in range(2):
        assert cli_here("eval", str(run / "results")).returncode == 0
    assert {p.name for p in (run / "results").iterdir()} <= {"_run.json", "_shard-000.json", ".lock-shard-000"} | {
        p.name for p in (run / "results").glob("part-*.parquet")
    }
    assert json.loads((run / "metrics.json").read_text())["complete"] is True
    assert len(pd.read_parquet(run / "results")) == len(base["rows"])
    out = tmp_path / "elsewhere"
    assert cli_here("eval", str(run), "--out", str(out)).returncode == 0
    assert (out / "metrics.json").exists() and (out / "next_token.png").exists()


def test_resume_compares_content_and_refuses_changed_data(base, tmp_path):
    """Case 4: edit the data file and rerun into the same dir: refused, naming the changed example."""
    run = copy_run(base, tmp_path / "run")
    assert base["rows"]["example_key"].str.len().eq(16).all()
    original = base["texts"].read_text()
    lines = original.splitlines()
    try:
        base["texts"].write_text(
            "\n".join([lines[0], "A completely different second text, edited later on."] + lines[2:]) + "\n"
        )
        proc = cli_here("run", *base["args"], f"hydra.run.dir={run}")
        one_line_error(proc, "example '1'", "other data", "hydra.run.dir")
        base["texts"].write_text("\n".join(lines[3:]) + "\n")  # lines removed: every stored id moved
        proc = cli_here("run", *base["args"], f"hydra.run.dir={run}")
        one_line_error(proc, "example '0'")
    finally:
        base["texts"].write_text(original)


def test_plan_skips_only_examples_whose_content_matches(tmp_path):
    """Case 4, in process: same ids with the same content are skipped; shards are disjoint by index."""
    cfg = compose("+experiment=next_token", "model=tiny_llama", "runner.num_shards=2", "runner.shard=1")
    examples = [{"example_id": str(i), "text": f"text {i}", "ids": [1, i]} for i in range(6)]
    plan = runner.plan_run(runner.open_run(cfg, tmp_path / "run"), examples, meta_of(cfg))
    assert [e["example_id"] for e in plan.todo] == ["1", "3", "5"]
    runner.execute(plan, fake_chunk, 2, "test")
    plan.release()
    again = runner.plan_run(runner.open_run(cfg, tmp_path / "run"), [dict(e) for e in examples], meta_of(cfg))
    assert again.todo == [] and again.skipped == 3
    again.release()
    changed = [dict(e) for e in examples]
    changed[3]["ids"] = [1, 99]
    with pytest.raises(UserError, match="example '3'"):
        runner.plan_run(runner.open_run(cfg, tmp_path / "run"), changed, meta_of(cfg))


def test_eval_of_an_unfinished_run_is_marked_partial_and_resume_still_finds_it(base, tmp_path):
    """Case 5: eval on an unfinished run writes "complete": false and says so; runner.resume finds the run."""
    parent = tmp_path / "outputs"
    run = copy_run(base, parent / "first")
    (run / "metrics.json").unlink()
    sorted((run / "results").glob("part-*.parquet"))[-1].unlink()
    proc = cli("eval", str(run), cwd=tmp_path)
    assert "partial metrics: 4 of 6 examples" in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["examples_stored"] == 4
    fingerprint = json.loads((run / "results" / "_run.json").read_text())["fingerprint"]
    assert runner.find_resumable(parent / "second", fingerprint) == run


def test_a_damaged_part_is_named_and_repair_recomputes_it(base, tmp_path):
    """Case 7: an empty, truncated or unreadable part is one error line with the fix; runner.repair=true
    moves it aside and recomputes its examples."""
    run = copy_run(base, tmp_path / "run")
    part = sorted((run / "results").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:200])
    proc = cli_here("run", *base["args"], f"hydra.run.dir={run}")
    one_line_error(proc, part.name, "runner.repair=true")
    proc = cli_here("eval", str(run))
    one_line_error(proc, part.name)
    run_in(run, *base["args"], "runner.repair=true")
    assert (run / "results" / ".quarantine" / part.name).exists()
    pd.testing.assert_frame_equal(rows(run / "results"), base["rows"])
