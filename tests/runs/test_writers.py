"""One writer per run dir, atomic writes, faults injected into the writer (from test_faults)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from patchscan.runs import lock, parts, runner, store
from tests.helpers import cli, cli_here, compose, one_line_error, rows, run_in, snapshot
from tests.runs.shared import FakeExperiment, copy_run, fake_chunk, meta_of

# ---------------------------------------------------------------- one shared small run


def test_a_second_writer_is_refused_naming_the_first(base, tmp_path):
    """Case 3: while one process holds a run dir, a second run on it (any runner settings) is refused."""
    run = copy_run(base, tmp_path / "run")
    before = snapshot(run)
    held = lock.ShardLock(run / "results", 0).acquire()
    try:
        proc = cli(
            "run", *base["args"], "runner.examples_per_part=3", f"hydra.run.dir={run}", cwd=tmp_path, check=False
        )
    finally:
        held.release()
    one_line_error(proc, "being written by pid", str(os.getpid()))
    after = snapshot(run)
    after.pop("results/.lock-shard-000"), before.pop("results/.lock-shard-000")
    assert after == before


def test_run_json_is_written_atomically(tmp_path, monkeypatch):
    """Case 3: _run.json goes through a temporary name; a crash mid-write leaves the old file whole."""
    target = tmp_path / "_run.json"
    store.write_atomic(target, '{"a": 1}')

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner.os, "replace", boom)
    with pytest.raises(OSError):
        store.write_atomic(target, '{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]


def test_a_refused_run_leaves_the_run_dir_byte_identical(base, tmp_path):
    """Case 6, and runner.seed in the fingerprint: a second seed into the same dir is refused, nothing changes."""
    before = snapshot(base["run"])
    proc = cli_here("run", *base["args"], "runner.seed=1", f"hydra.run.dir={base['run']}")
    one_line_error(proc, "runner.seed=0 there, 1 here")
    proc = cli_here("run", *base["args"], "dataset.limit=abc", f"hydra.run.dir={base['run']}")
    one_line_error(proc, "dataset.limit='abc'")
    assert snapshot(base["run"]) == before


def test_tests_do_not_write_into_the_users_cache():
    from patchscan.paths import cache_root, model_cache_root

    home = Path.home() / ".cache" / "patchscan"
    assert not str(cache_root()).startswith(str(home)) and not str(model_cache_root()).startswith(str(home))


KILL_BEFORE_RENAME = """
import os, signal, sys
import patchscan.runs.runner as r
calls = [0]
real = os.replace
def replace(src, dst):
    if str(dst).endswith('.parquet'):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
r.os.replace = replace
from patchscan.cli.main import main
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
from patchscan.cli.main import main
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
        parts.write_part(
            runner.with_keys(fake_chunk(chunk, lambda n: None), chunk),
            plan.results_dir,
            f"part-{shard:03d}-{chunk[0]['_index']:07d}.parquet",
            plan.run_id,
        )
    barrier.wait()  # all eight write their last part, their _run.json and their metrics at once
    parts.write_part(
        runner.with_keys(fake_chunk(last, lambda n: None), last),
        plan.results_dir,
        f"part-{shard:03d}-{last[0]['_index']:07d}.parquet",
        plan.run_id,
    )
    runner.finalize(FakeExperiment, cfg, Path(out), plan.results_dir, quiet=True)
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
    df = parts.read_results(results)
    assert df["example_id"].nunique() == 40 and not df.duplicated(["example_id", "source_layer"]).any()
    assert json.loads((results / "_run.json").read_text())["n_examples"] == 40
    assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]
    for s in range(8):
        json.loads((tmp_path / f"job{s}" / "metrics.json").read_text())
    cfg = compose("+experiment=next_token")
    assert runner.finalize(FakeExperiment, cfg, tmp_path, results, quiet=True)["complete"] is True
