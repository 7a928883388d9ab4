"""The command line end to end: Parquet contract, eval, resume after SIGKILL, shards, bad input.

A subprocess where the process is the contract (a run as a user types it, SIGKILL, -m multirun, a
bad value's exit code and line); elsewhere the same `main` or job function in this process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import cli, cli_here, run_in

TINY = ["+experiment=next_token", "model=tiny_llama", "dataset.limit=6", "affine_lens.train_texts=40"]
BASE_COLUMNS = {
    "source_token_ids",
    "target_token_ids",
    "example_id",
    "source_position",
    "source_layer",
    "target_position",
    "target_layer",
    "model",
    "target_model",
    "method",
}
NEXT_TOKEN_COLUMNS = {"source_text", "target_prompt", "pred_token_id", "ref_token_id", "precision_at_1", "surprisal"}


def test_run_writes_the_parquet_contract_and_eval_recomputes(tmp_path):
    """`patchscan run experiment=...` as a user types it (no `+`: the root config has an experiment slot)."""
    run = tmp_path / "run"
    out = cli("run", "experiment=next_token", *TINY[1:], f"hydra.run.dir={run}", cwd=tmp_path)
    assert "token_identity" in out.stdout
    df = pd.read_parquet(run / "results")
    assert BASE_COLUMNS | NEXT_TOKEN_COLUMNS <= set(df.columns)
    assert set(df["method"]) == {"token_identity", "logit_lens", "affine_lens"}
    assert len(df) == 6 * 3 * 4 and df["example_id"].nunique() == 6
    lens = df[df["method"] == "logit_lens"]
    assert lens["target_prompt"].isna().all() and (lens["target_layer"] == 3).all()
    ident = df[df["method"] == "token_identity"]
    assert (ident["target_layer"] == ident["source_layer"]).all()
    assert all(list(t)[-1] == list(ident["target_token_ids"].iloc[0])[-1] for t in ident["target_token_ids"])
    # at the last block every method reads the model's own output: precision@1 must be 1
    assert df[df["source_layer"] == 3]["precision_at_1"].all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "next_token.png").stat().st_size > 10_000
    assert (run / ".hydra" / "config.yaml").exists()
    meta = json.loads((run / "results" / "_run.json").read_text())
    assert meta["model"]["n_blocks"] == 4 and meta["versions"]["torch"]
    (run / "metrics.json").unlink()
    assert cli_here("eval", str(run)).returncode == 0
    assert json.loads((run / "metrics.json").read_text())["by_layer"] == metrics["by_layer"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = [
        "+experiment=next_token",
        "model=smollm2_135m",
        "dataset.limit=12",
        "methods=[token_identity,logit_lens]",
        "sweep.source_layers=::5",  # 6 of the 30 blocks: three runs of the built-in model stay short
        "runner.examples_per_part=1",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchscan.cli.main", "run", *args, f"hydra.run.dir={killed}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "results").glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list((killed / "results").glob("part-*.parquet")))
    assert 3 <= written < 12, "the run must be killed mid-way"
    assert not (killed / "metrics.json").exists()
    run_in(killed, *args)  # the resume and the uninterrupted run: the same job, in this process
    whole = run_in(tmp_path / "whole", *args)
    key = ["example_id", "method", "source_layer", "target_layer"]
    a = pd.read_parquet(killed / "results").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(whole / "results").sort_values(key).reset_index(drop=True)
    assert not a.duplicated(key).any() and len(a) == len(b) == 12 * 2 * 6
    pd.testing.assert_frame_equal(a.drop(columns="surprisal"), b.drop(columns="surprisal"))
    assert (a["surprisal"] - b["surprisal"]).abs().max() < 1e-3


def test_resume_flag_finds_the_unfinished_run(tmp_path, monkeypatch):
    args = [*TINY, "methods=[logit_lens]", "runner.examples_per_part=2"]
    first = run_in(tmp_path / "outputs" / "next_token" / "first", *args)
    (first / "metrics.json").unlink()
    parts = sorted((first / "results").glob("part-*.parquet"))
    parts[-1].unlink()  # as if killed before the last part
    monkeypatch.chdir(tmp_path)  # the default run dir, outputs/next_token/DATE, is a sibling of the first
    out = cli_here("run", *args, "runner.resume=true")
    assert out.returncode == 0 and str(first) in out.stdout
    assert pd.read_parquet(first / "results")["example_id"].nunique() == 6


def test_submitit_local_multirun_shards_read_back_as_one_dataset(tmp_path):
    shared = tmp_path / "shared_results"
    cli(
        "run",
        "-m",
        "hydra/launcher=local",
        *TINY,
        "methods=[logit_lens,token_identity]",
        "runner.num_shards=2",
        "runner.shard=0,1",
        f"runner.results_dir={shared}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    df = pd.read_parquet(shared)
    assert df["example_id"].nunique() == 6 and not df.duplicated(["example_id", "method", "source_layer"]).any()
    assert len(list(shared.glob("part-000-*"))) and len(list(shared.glob("part-001-*")))
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2


def _bad_cases(tmp: Path):
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    return {
        "model": (["model=nope"], "nope"),
        "experiment": (["+experiment=nope"], "nope"),
        "dataset": (["dataset=nope"], "nope"),
        "source layer": (["sweep.source_layers=[0,99]"], "99"),
        "target layer": (["sweep.target_layers=[7]"], "7"),
        "placeholder": (["patchscope.target_prompt=no marker here"], "placeholder"),
        "missing file": (["dataset=text", "dataset.path=/nonexistent/texts.txt"], "/nonexistent/texts.txt"),
        "empty file": (["dataset=text", f"dataset.path={tmp / 'empty.txt'}"], "empty"),
        "malformed jsonl": (["dataset=jsonl", f"dataset.path={tmp / 'bad.jsonl'}"], "line 2"),
        "unreadable": (["dataset=text", f"dataset.path={tmp / 'binary.txt'}"], "binary.txt"),
        "method": (["methods=[bogus]"], "bogus"),
        "shard": (["runner.shard=3", "runner.num_shards=2"], "runner.shard=3"),
        "layer range": (["sweep.source_layers=bogus"], "bogus"),
    }


# a subprocess for one error found before Hydra starts and one found inside the job; the others run the
# same `main` in this process (exit code, stderr and traceback checks alike)
IN_A_SUBPROCESS = ("model", "source layer")


@pytest.mark.parametrize("case", list(_bad_cases(Path("/tmp")).keys()))
def test_bad_input_gives_one_clear_line(tmp_path, case):
    extra, needle = _bad_cases(tmp_path)[case]
    base = [a for a in TINY if not (case == "experiment" and a.startswith("+experiment"))]
    run = tmp_path / "run"
    args = ["run", *base, *extra, f"hydra.run.dir={run}"]
    proc = cli(*args, cwd=tmp_path, check=False) if case in IN_A_SUBPROCESS else cli_here(*args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert lines and lines[-1].startswith("patchscan: error:") and needle in lines[-1], proc.stderr
    assert not (run / "metrics.json").exists() and not list(run.glob("results/part-*"))


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_neox"])
def test_next_token_rows_match_a_plain_hf_recomputation(tmp_path, model):
    """scripts/crosscheck_next_token.py shares no engine code: it must reproduce every stored prediction."""
    run = run_in(
        tmp_path / "run",
        "experiment=next_token",
        f"model={model}",
        "dataset.limit=8",
        "methods=[token_identity,logit_lens]",
    )
    script = Path(__file__).resolve().parents[2] / "scripts" / "crosscheck_next_token.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(run)], check=False, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "reference       8/8 stored predictions reproduced" in proc.stdout
    assert "token_identity  24/24" in proc.stdout and "logit_lens      24/24" in proc.stdout
