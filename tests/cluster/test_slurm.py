"""docs/cluster.md's SLURM recipe on a single-node Slurm (scripts/slurm_local.sh), through Hydra's submitit launcher.

The session fixture starts the cluster (installing slurm-wlm, slurmdbd, munge and mariadb with apt-get
if they are missing, which needs root) in a private state dir on free ports, and stops it in a
finalizer, also when a test fails. If the cluster cannot start, the tests fail with its log: they
are never skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
KEY = ["example_id", "method", "source_layer", "target_layer"]
SHARDS = 4
pytestmark = pytest.mark.cluster  # `make test-slurm` (CI runs it after `make test`)
LIMIT = 40  # 10 examples a shard, one part each (the preemption tests hold a shard at a barrier, whatever its speed)


def config(limit: int = LIMIT, model: str = "tiny_llama") -> list[str]:
    return [
        "+experiment=next_token",
        f"model={model}",
        f"dataset.limit={limit}",
        "methods=[token_identity,logit_lens]",
        "runner.examples_per_part=1",
    ]


CONFIG = config()
# docs/cluster.md's recipe, with this machine's resources instead of a GPU node's
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]


def _free_port_block(n: int = 4) -> int:
    """The first of n consecutive free TCP ports on 127.0.0.1, below the ephemeral range."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


def _script(command: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node cluster; yields the environment that points sbatch & co. at it."""
    state = tempfile.mkdtemp(prefix="patchscan-slurm-")
    env = dict(os.environ, PATCHSCAN_SLURM_DIR=state, PATCHSCAN_SLURM_PORT=str(_free_port_block()))
    t0 = time.time()
    try:
        started = _script("start", env)
        if started.returncode != 0:
            pytest.fail(
                f"the local Slurm did not start ({SCRIPT} start, state {state}):\n{started.stderr[-4000:]}",
                pytrace=False,
            )
        print(f"\nlocal Slurm started in {time.time() - t0:.0f} s: {started.stderr.strip()}")
        yield dict(env, SLURM_CONF=f"{state}/etc/slurm.conf")
    finally:
        stopped = _script("stop", env, timeout=120)
        assert stopped.returncode == 0, f"{SCRIPT} stop left something running:\n{stopped.stderr[-3000:]}"
        shutil.rmtree(state, ignore_errors=True)


def sweep_args(
    results: Path, sweep: Path, *extra: str, shards: str = "0,1,2,3", limit: int = LIMIT, model: str = "tiny_llama"
) -> list[str]:
    return [
        "run",
        "-m",
        *LAUNCHER,
        *extra,
        *config(limit, model),
        f"runner.num_shards={SHARDS}",
        f"runner.shard={shards}",
        f"runner.results_dir={results}",
        f"hydra.sweep.dir={sweep}",
    ]


@pytest.fixture(scope="session")
def unsharded(tmp_path_factory):
    """One local, unsharded run of the same config: its rows and metrics.json."""
    run = tmp_path_factory.mktemp("unsharded") / "run"
    cli("run", *CONFIG, f"hydra.run.dir={run}", cwd=run.parent, env=dict(os.environ))
    return rows(run / "results"), json.loads((run / "metrics.json").read_text())


def rows(results: Path) -> pd.DataFrame:
    return pd.read_parquet(results).sort_values(KEY).reset_index(drop=True)


def assert_same_rows(df: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert not df.duplicated(KEY).any(), "a row was written twice"
    assert len(df) == len(ref) and df["example_id"].nunique() == LIMIT
    pd.testing.assert_frame_equal(df.drop(columns="surprisal"), ref.drop(columns="surprisal"))
    assert (df["surprisal"] - ref["surprisal"]).abs().max() < 1e-4


def eval_metrics(results: Path, cwd: Path, env: dict) -> dict:
    """`patchscan eval DIR` and the metrics.json it says it wrote (inside or beside DIR: either is fine here)."""
    out = cli("eval", str(results), cwd=cwd, env=env)
    path = re.search(r"^metrics: (.+)$", out.stdout, re.M)
    assert path, out.stdout[-2000:]
    return json.loads(Path(path.group(1).strip()).read_text())


def assert_same_metrics(metrics: dict, ref: dict) -> None:
    assert metrics["n_examples"] == ref["n_examples"] == LIMIT
    assert len(metrics["by_layer"]) == len(ref["by_layer"])
    for got, want in zip(metrics["by_layer"], ref["by_layer"]):
        assert {k: v for k, v in got.items() if isinstance(v, (str, int, bool))} == {
            k: v for k, v in want.items() if isinstance(v, (str, int, bool))
        }
        for k, v in want.items():
            if isinstance(v, float):
                assert got[k] == pytest.approx(v, abs=1e-5), (k, got, want)


def submitted(sweep: Path, n: int = SHARDS, before: frozenset = frozenset(), timeout: float = 300) -> list[str]:
    """The Slurm ids of a sweep's n jobs, in Hydra's job order, once submitted (submitit makes a folder per
    job: ID_TASK for the tasks of an array, ID for a sweep of one job); `before`: an earlier submission's."""
    pattern = r"\d+_\d+" if n > 1 else r"\d+"
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = {p.name for p in (sweep / ".submitit").glob("*") if p.is_dir()} - before
        tasks = [name for name in names if re.fullmatch(pattern, name)]
        if len(tasks) == n:
            return sorted(tasks, key=lambda name: int(name.split("_")[-1]) if n > 1 else 0)
        time.sleep(0.2)
    raise AssertionError(f"no job submitted under {sweep / '.submitit'}")


def job_of(task: str) -> str:
    return task.split("_")[0]


def sacct_states(job: str, env: dict, timeout: float = 60) -> dict[str, str]:
    """Final Slurm states of a job's tasks, from accounting (which can lag the job's end by a moment)."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        states = {i: state.split()[0] for i, state in (line.split("|", 1) for line in out.splitlines() if line)}
        if states and not {"PENDING", "RUNNING", "COMPLETING"} & set(states.values()) or time.time() > deadline:
            return states
        time.sleep(0.5)


def wait_until_gone(job: str, env: dict, timeout: float = 300) -> None:
    """Until no task of the array is queued or running (the launcher stops waiting at the first failed task)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", job, "-o", "%i"], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        if not out.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"array job {job} still in the queue after {timeout} s")


def shard_parts(results: Path, shard: int) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in results.glob(f"part-{shard:03d}-*.parquet")}


def wait_for_part(results: Path, shard: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not shard_parts(results, shard):
        assert time.time() < deadline, f"shard {shard} wrote no part in {timeout} s"
        time.sleep(0.05)


def job_log(sweep: Path, task: str) -> str:
    """What the README says: stdout and stderr of a job in SWEEP/.submitit/ID/ID_0_log.out|err."""
    folder = sweep / ".submitit" / task
    return "".join((folder / f"{task}_0_log.{ext}").read_text(errors="replace") for ext in ("out", "err"))


def test_four_shard_sweep_on_slurm_equals_one_local_run(slurm, unsharded, tmp_path):
    results, sweep = tmp_path / "results", tmp_path / "sweep"
    cli(*sweep_args(results, sweep, "hydra.launcher.timeout_min=10"), cwd=tmp_path, env=slurm)
    tasks = submitted(sweep)
    assert len(tasks) == SHARDS and sacct_states(job_of(tasks[0]), slurm) == {t: "COMPLETED" for t in tasks}
    for k, task in enumerate(tasks):  # where the README says the logs are
        assert len(shard_parts(results, k)) == LIMIT // SHARDS
        assert "results: " in job_log(sweep, task)
        assert (sweep / str(k) / "cli.log").is_file() and (sweep / str(k) / ".hydra" / "overrides.yaml").is_file()
    ref_rows, ref_metrics = unsharded
    assert_same_rows(rows(results), ref_rows)
    assert_same_metrics(eval_metrics(results, tmp_path, slurm), ref_metrics)


def start_held(args: list[str], env: dict, tmp_path: Path, shard: int) -> subprocess.Popen:
    """`patchscan ARGS` in the background, its `shard` stopping after its first part until the test removes
    the flag (the runner's PATCHSCAN_HOLD_DIR barrier): a cancel or time limit then hits it midway on any machine."""
    hold = tmp_path / "hold"
    hold.mkdir(exist_ok=True)
    (hold / f"shard-{shard:03d}").touch()
    return subprocess.Popen(
        [sys.executable, "-m", "patchscan.cli.main", *args],
        cwd=tmp_path,
        env=dict(env, PATCHSCAN_HOLD_DIR=str(hold)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_cancelled_shard_resumes_when_the_same_command_is_resubmitted(slurm, unsharded, tmp_path):
    """Shard 1 is held after its first part (a barrier, not a race with the machine's speed) and cancelled
    there: Slurm's SIGTERM (bypassed by submitit) and SIGKILL KillWait seconds later find it waiting."""
    results, sweep = tmp_path / "results", tmp_path / "sweep"
    args = sweep_args(results, sweep, "hydra.launcher.timeout_min=10")
    first = start_held(args, slurm, tmp_path, shard=1)
    try:
        tasks = submitted(sweep)
        wait_for_part(results, 1)
        subprocess.run(["scancel", tasks[1]], env=slurm, check=True, timeout=30)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    # the launcher waits for the tasks in order and gives up at the cancelled one, with submitit's error
    assert first.returncode != 0 and "CANCELLED" in out, out[-3000:]
    wait_until_gone(job_of(tasks[0]), slurm)  # the other shards go on without the launcher
    assert sacct_states(job_of(tasks[0]), slurm) == {
        t: "CANCELLED" if k == 1 else "COMPLETED" for k, t in enumerate(tasks)
    }
    before = {k: shard_parts(results, k) for k in range(SHARDS)}
    assert len(before[1]) == 1, f"shard 1 must stop at the barrier after its first part ({len(before[1])} written)"
    assert all(len(before[k]) == LIMIT // SHARDS for k in (0, 2, 3))

    cli(*args, cwd=tmp_path, env=slurm)  # the same command again
    again = submitted(sweep, before=frozenset(tasks) | {job_of(tasks[0])})
    for k in range(SHARDS):
        after = shard_parts(results, k)
        assert len(after) == LIMIT // SHARDS
        assert {n: after[n] for n in before[k]} == before[k], "a part written before the cancel was written again"
        todo = LIMIT // SHARDS - len(before[k])
        assert (
            f"{LIMIT // SHARDS - todo} examples already done"
            in job_log(sweep, again[k]) + (sweep / str(k) / "cli.log").read_text()
        ), f"shard {k} did not resume"
    ref_rows, ref_metrics = unsharded
    assert_same_rows(rows(results), ref_rows)
    assert_same_metrics(eval_metrics(results, tmp_path, slurm), ref_metrics)


def test_shard_past_its_time_limit_resumes_when_resubmitted(slurm, tmp_path):
    """hydra.launcher.timeout_min=1: Slurm kills the job at its limit (TIMEOUT), the resubmission finishes the rest.

    To outlive one minute without spending the machine's CPU, the job waits at the runner's barrier after its
    first part (PATCHSCAN_HOLD_DIR); Slurm's time limit sends SIGTERM (submitit bypasses it) and kills it
    KillWait seconds later, still waiting. signal_delay_s=0: no USR2 warning before the limit (with
    submitit's default of 120 s, a job of less than 2 minutes gets it at once; docs/cluster.md explains it).
    """
    limit = 40
    per_shard = limit // SHARDS
    results, sweep = tmp_path / "results", tmp_path / "sweep"
    short = sweep_args(
        results, sweep, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=0", shards="1", limit=limit
    )
    first = start_held(short, slurm, tmp_path, shard=1)
    try:
        (job,) = submitted(sweep, 1)  # a sweep of one job: a plain job, no array
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0 and "TIMEOUT" in out, out[-3000:]
    wait_until_gone(job, slurm)
    assert sacct_states(job, slurm) == {job: "TIMEOUT"}
    before = shard_parts(results, 1)
    assert len(before) == 1, f"the job must stop at the barrier after its first part ({len(before)} written)"

    longer = [a.replace("timeout_min=1", "timeout_min=10") for a in short]
    cli(*longer, cwd=tmp_path, env=slurm)
    (again,) = submitted(sweep, 1, before=frozenset({job}))
    after = shard_parts(results, 1)
    assert len(after) == per_shard and {n: after[n] for n in before} == before
    assert f"{len(before)} examples already done" in job_log(sweep, again) + (sweep / "0" / "cli.log").read_text()
    df = pd.read_parquet(results)
    assert df["example_id"].nunique() == per_shard and not df.duplicated(KEY).any()
