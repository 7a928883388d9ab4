"""Identities that are exact (issue 27, cases 2-4 and the map-cache tracebacks; issue 26's one atomic
writer and one map-cache layout): any change of any weight or data byte changes the run's identity,
every part carries it and every reader checks it, and a damaged map cache is recomputed."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import patchscan as ps
from patchscan.data.texts import load_texts
from patchscan.errors import UserError
from patchscan.models import fingerprints
from patchscan.runs import parts, store
from tests.helpers import ROOT, cli, cli_here, one_line_error, run_in

TEXTS = load_texts({"kind": "builtin", "name": "texts"})


def tiny_folder(path: Path, seed: int = 0) -> Path:
    """A tiny llama saved as a model folder (weights, config, tokenizer)."""
    from patchscan.models.loading import build_tiny

    model, tokenizer = build_tiny("llama", seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def edit_one_embedding_row(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name][7] += 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------- case 2: an exact weight fingerprint


def test_one_edited_embedding_row_changes_a_folder_models_fingerprint(tmp_path):
    """Case 2: one row of 49k in the embedding of a folder model changes its identity (the sampled
    fingerprint missed it); an unchanged folder keeps it, from the cached file digest."""
    folder = tiny_folder(tmp_path / "model")
    before = fingerprints.model_fingerprint(ps.load_model(str(folder), device="cpu"))
    assert fingerprints.model_fingerprint(ps.load_model(str(folder), device="cpu")) == before
    cache = json.loads((fingerprints._digest_cache()).read_text())
    assert str((folder / "model.safetensors").resolve()) in cache
    edit_one_embedding_row(folder)
    assert fingerprints.model_fingerprint(ps.load_model(str(folder), device="cpu")) != before


def test_a_weight_changed_in_memory_changes_the_fingerprint():
    """Case 2, models held in memory: a tiny model (no files) is hashed tensor by tensor; a model
    loaded from files and edited in memory afterwards falls back to the tensors' hash too."""
    a = ps.load_model("tiny_llama", device="cpu")
    b = ps.load_model("tiny_llama", device="cpu")
    assert fingerprints.model_fingerprint(a) == fingerprints.model_fingerprint(b)
    with torch.no_grad():
        b.model.model.embed_tokens.weight[123, 5] += 1e-3
    fingerprints.forget(b)
    assert fingerprints.model_fingerprint(a) != fingerprints.model_fingerprint(b)


def test_a_file_backed_view_edited_after_loading_is_not_identified_by_its_files(tmp_path):
    folder = tiny_folder(tmp_path / "model")
    view = ps.load_model(str(folder), device="cpu")
    before = fingerprints.model_fingerprint(view)
    with torch.no_grad():
        view.model.model.embed_tokens.weight[3, 3] = 0.0  # bumps the tensor's version counter
    assert fingerprints.model_fingerprint(view) != before


CLI_RUN = [
    "+experiment=next_token",
    "methods=[logit_lens,affine_lens]",
    "dataset=text",
    "dataset.limit=4",
    "affine_lens.train_texts=30",
    "affine_lens.max_positions=400",
    "runner.examples_per_part=2",
    "sweep.source_layers=[1,2]",
]


def test_an_edited_folder_model_neither_resumes_the_old_run_nor_reuses_its_maps(tmp_path):
    """Case 2 through the CLI: the edited model is refused in the old run dir (one line naming the
    weights), and a run of it elsewhere fits its own affine-lens maps."""
    folder = tiny_folder(tmp_path / "my-llama")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:40]) + "\n")
    args = [*CLI_RUN, "model.source=folder", f"model.path={folder}", f"dataset.path={texts}"]
    cache = tmp_path / "cache"
    env = {**os.environ, "PATCHSCAN_CACHE": str(cache)}
    cli("run", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    edit_one_embedding_row(folder)
    proc = cli("run", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env, check=False)
    one_line_error(proc, "another run", "model weights", "my-llama")
    cli("run", *args, f"hydra.run.dir={tmp_path / 'edited'}", cwd=tmp_path, env=env)
    assert len(list((cache / "maps").glob("affine-lens-my-llama-*"))) == 2


# ---------------------------------------------------------------- case 3: everything that decides a row


@pytest.fixture
def lens_run(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:40]) + "\n")
    args = [*CLI_RUN, "model=tiny_llama", f"dataset.path={texts}"]
    run = run_in(tmp_path / "run", *args)
    return {"args": args, "run": run, "texts": texts}


def kill_last_part(run: Path) -> None:
    """What a kill after the first part leaves: no metrics, the last part gone."""
    (run / "metrics.json").unlink()
    sorted((run / "results").glob("part-*.parquet"))[-1].unlink()


def test_edited_held_out_texts_are_refused_on_resume(lens_run):
    """Case 3: the affine lens' held-out texts (the file's last 30 lines, never evaluated) edited between
    a kill and the rerun: refused with one line naming the data file (before: refitted and resumed)."""
    kill_last_part(lens_run["run"])
    lines = lens_run["texts"].read_text().splitlines()
    lens_run["texts"].write_text("\n".join(lines[:-1] + ["An edited held-out text about something else."]) + "\n")
    proc = cli_here("run", *lens_run["args"], f"hydra.run.dir={lens_run['run']}")
    one_line_error(proc, "another run", "data", "dataset.path", "changed")
    lens_run["texts"].write_text("\n".join(lines) + "\n")  # restored: the resume goes ahead
    assert cli_here("run", *lens_run["args"], f"hydra.run.dir={lens_run['run']}").returncode == 0


def test_maps_of_other_fitting_code_are_refused_on_resume(lens_run, monkeypatch):
    """Case 3: the map identity is part of the run's: maps fitted by other code (FIT_VERSION) refuse a resume."""
    kill_last_part(lens_run["run"])
    monkeypatch.setattr(fingerprints, "FIT_VERSION", fingerprints.FIT_VERSION + 1)
    with pytest.raises(UserError, match=r"fitted maps: affine-lens-tiny_llama"):
        run_in(lens_run["run"], *lens_run["args"])


@pytest.mark.parametrize("data", ["entity list", "LRE file"])
def test_edited_entity_and_lre_files_are_refused_on_resume(tmp_path, data):
    """Case 3: an entity list or an LRE relation file changed outside the examples that ran (beyond
    dataset.limit) still changes the run's identity."""
    if data == "entity list":
        file = tmp_path / "entities.tsv"
        shutil.copy(ROOT / "src/patchscan/data/builtin/entities.tsv", file)
        args = ["experiment=entity_resolution", f"dataset.path={file}", "dataset.limit=2"]
    else:
        lre = tmp_path / "lre"
        shutil.copytree(ROOT / "tests/fixtures/lre", lre)
        file = sorted(lre.rglob("*.json"))[-1]
        args = ["experiment=attribute_extraction", f"dataset.path={lre}", "dataset.relations=[country_capital_city]"]
        args += ["dataset.per_relation_limit=2", "controls=[prompt_only]"]
    args += ["model=tiny_llama", "sweep.source_layers=[1]", "sweep.target_layers=[1]", "generation.max_new_tokens=2"]
    run = run_in(tmp_path / "run", *args)
    file.write_text(file.read_text().rstrip() + "\n\n")
    with pytest.raises(UserError, match="data: dataset.path="):
        run_in(run, *args)


# ---------------------------------------------------------------- case 4: parts carry their run's identity


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    args = ["+experiment=next_token", "methods=[logit_lens]", "dataset.limit=4", "runner.examples_per_part=2"]
    a = run_in(tmp / "a", *args, "model=tiny_llama")
    b = run_in(tmp / "b", *args, "model=tiny_gpt2")
    return {"a": a, "b": b, "args": args}


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_every_part_carries_the_run_id_of_its_run_json(two_runs):
    for run in (two_runs["a"], two_runs["b"]):
        run_id = json.loads((run / "results" / "_run.json").read_text())["run_id"]
        for part in (run / "results").glob("part-*.parquet"):
            assert pq.read_schema(part).metadata[parts.RUN_ID_KEY].decode() == run_id
    assert parts.recorded_run_id(two_runs["a"] / "results") != parts.recorded_run_id(two_runs["b"] / "results")


def test_parts_without_run_json_are_not_adopted_by_another_model(two_runs, tmp_path):
    """Case 4: with _run.json deleted, a run of another model is refused (it said "4 examples already
    done" and took the rows), and so are eval and show."""
    run = copy_of(two_runs["a"], tmp_path / "run")
    (run / "results" / "_run.json").unlink()
    before = sorted(p.name for p in (run / "results").iterdir())
    proc = cli_here("run", *two_runs["args"], "model=tiny_gpt2", f"hydra.run.dir={run}")
    one_line_error(proc, "no _run.json", "not adopted")
    assert sorted(p.name for p in (run / "results").iterdir()) == before
    one_line_error(cli_here("eval", str(run / "results")), "no _run.json")


def test_a_part_copied_in_twice_is_refused_by_every_reader(two_runs, tmp_path):
    """Case 4: a part under a second name (counted twice: complete with n = 6 for 4) is refused by
    eval, show and the resume, naming both parts; runner.repair=true sets the copy aside."""
    run = copy_of(two_runs["a"], tmp_path / "run")
    first = sorted((run / "results").glob("part-*.parquet"))[0]
    shutil.copy(first, run / "results" / "part-000-0000099.parquet")
    one_line_error(cli_here("eval", str(run)), "part-000-0000099.parquet", "repeats example", first.name)
    one_line_error(cli_here("show", str(run), "--example", "0"), "repeats example")
    proc = cli_here("run", *two_runs["args"], "model=tiny_llama", f"hydra.run.dir={run}")
    one_line_error(proc, "repeats example", "runner.repair=true")
    run_in(run, *two_runs["args"], "model=tiny_llama", "runner.repair=true")
    assert (run / "results" / ".quarantine" / "part-000-0000099.parquet").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["examples_stored"] == 4


def test_a_part_of_another_run_is_not_merged_into_the_metrics(two_runs, tmp_path):
    """Case 4: a part of the tiny_gpt2 run dropped into the tiny_llama run's results dir is refused by
    eval (it was merged into the metrics) and by the resume."""
    run = copy_of(two_runs["a"], tmp_path / "run")
    stray = sorted((two_runs["b"] / "results").glob("part-*.parquet"))[-1]
    shutil.copy(stray, run / "results" / "part-000-0000050.parquet")
    one_line_error(cli_here("eval", str(run)), "part-000-0000050.parquet", "belongs to another run")
    with pytest.raises(UserError, match="belongs to another run"):
        parts.read_results(run)
    proc = cli_here("run", *two_runs["args"], "model=tiny_llama", f"hydra.run.dir={run}")
    one_line_error(proc, "belongs to another run")


# ---------------------------------------------------------------- the map cache: one layout, damage recomputed


def _fit(lm, **kwargs):
    return ps.AffineLens.fit(lm, TEXTS[:30], layers=[1, 2], max_positions=400, **kwargs)


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "not a tensor", "not a dict"])
def test_a_damaged_map_in_the_cache_is_recomputed_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("PATCHSCAN_CACHE", str(tmp_path))
    lm = ps.load_model("tiny_llama", device="cpu")
    fresh = _fit(lm, cache=False)
    _fit(lm)
    (folder,) = (tmp_path / "maps").glob("affine-lens-tiny_llama-*")
    file = folder / "block1.pt"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:300])
    else:
        bad = {
            "wrong shape": {"kind": "affine", "weight": torch.zeros(3, 3), "bias": torch.zeros(3)},
            "not a tensor": {"kind": "affine", "weight": [1, 2], "bias": 3},
            "not a dict": torch.zeros(2),
        }[damage]
        torch.save(bad, file)
    with caplog.at_level(logging.WARNING):
        again = _fit(lm)
    assert any("block1.pt" in r.getMessage() and "fitting the maps again" in r.getMessage() for r in caplog.records)
    for layer in (1, 2):
        assert torch.allclose(again.maps[layer].weight, fresh.maps[layer].weight, atol=1e-5)
    assert ps.AffineLens.load(lm, folder).layers == [1, 2]  # rewritten whole


def test_a_damaged_map_given_to_load_is_one_error_line(tmp_path):
    (tmp_path / "block1.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match="block1.pt is truncated or unreadable"):
        ps.AffineLens.load(ps.load_model("tiny_llama", device="cpu"), tmp_path)


def test_both_map_caches_share_one_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHSCAN_CACHE", str(tmp_path))
    lm = ps.load_model("tiny_llama", device="cpu")
    _fit(lm)
    ps.AffineMaps.fit_between(lm, lm, TEXTS[:30], [(1, 2)], max_positions=400)
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "maps").iterdir())
    assert names == ["affine-lens-tiny_llama", "cross-model-tiny_llama--tiny_llama"]


def test_a_cache_variable_naming_a_file_is_one_error_line(tmp_path, monkeypatch):
    """The tracebacks: PATCHSCAN_CACHE pointing at a file, through the API and the CLI."""
    file = tmp_path / "cache-file"
    file.write_text("not a folder")
    monkeypatch.setenv("PATCHSCAN_CACHE", str(file))
    with pytest.raises(UserError, match="PATCHSCAN_CACHE=.*cache-file is a file"):
        _fit(ps.load_model("tiny_llama", device="cpu"))
    proc = cli_here("run", *CLI_RUN[:2], "model=tiny_llama", "dataset.limit=2", f"hydra.run.dir={tmp_path / 'r'}")
    one_line_error(proc, "PATCHSCAN_CACHE=", "is a file")


# ---------------------------------------------------------------- one atomic writer


def test_the_atomic_writer_uses_a_name_unique_to_the_process_and_the_call(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    ps.engine.Affine(torch.eye(2), torch.zeros(2)).save(tmp_path / "m.pt")
    ps.engine.Affine(torch.eye(2), torch.zeros(2)).save(tmp_path / "m.pt")
    store.write_atomic(tmp_path / "folder", lambda tmp: (tmp.mkdir(), (tmp / "a").write_text("a")))
    assert len(set(seen)) == 3 and all(n.startswith(".") and f".{os.getpid()}." in n for n in seen)
    assert (tmp_path / "folder" / "a").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.pt"]


def test_every_writer_goes_through_store_write_atomic():
    """One atomic writer: no other module renames a temporary file into place (runner.repair's move of a
    bad part aside is a move, not a write)."""
    offenders = []
    for path in sorted((ROOT / "src" / "patchscan").rglob("*.py")):
        text = path.read_text()
        count = len(re.findall(r"os\.(?:replace|rename)\(|\w*tmp\w*\.(?:replace|rename)\(", text))
        allowed = {"store.py": 1, "parts.py": 1}.get(path.name, 0)  # parts: _set_aside
        if count > allowed:
            offenders.append(path.name)
    assert offenders == []
