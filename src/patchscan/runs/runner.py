"""Examples -> chunks -> scope -> rows -> Parquet parts, with resume, shards, locks and progress.

Each part file holds all rows of a chunk of examples and is written to a hidden temporary
name, then renamed, so a killed run leaves only complete parts. Every row carries the
example's `example_key`, a hash of its content (source and target texts and token ids, subject,
object, position), so a rerun into the same results dir skips exactly the examples whose stored
key matches, and refuses to mix results of changed data.

One writer per (results dir, shard): `results/.lock-shard-SSS` is locked (flock) for the whole
run and names the holder; shards take the examples whose stable index i has i % num_shards ==
shard, so shards sharing a results dir write disjoint examples.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from patchscan.errors import UserError
from patchscan.runs.identity import (
    config_difference,
    config_fingerprint,
    example_key,
    identity_difference,
    run_id,
    run_identity,
)
from patchscan.runs.lock import ShardLock
from patchscan.runs.parts import (
    META_NAME,
    part_files,
    read_results,
    recorded_run_id,
    run_meta,
    stored_examples,
    strict_json,
    write_part,
)
from patchscan.runs.row_schema import int_columns
from patchscan.runs.store import write_atomic

if TYPE_CHECKING:
    from patchscan.engine.counting import Counts
    from patchscan.models.fingerprints import Inputs

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 5.0


# ---------------------------------------------------------------- plan


@dataclass
class RunPlan:
    """Where results go and which examples are left to run."""

    run_dir: Path
    results_dir: Path
    todo: list[dict] = field(default_factory=list)
    skipped: int = 0
    shard: int = 0
    num_shards: int = 1
    lock: ShardLock | None = None
    mine: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    inputs: Inputs | None = None  # models and maps the run uses, recorded from open_run to release
    run_id: str | None = None  # set by plan_run: every part written carries it
    made: list[Path] = field(default_factory=list)  # dirs and lock file open_run created, deepest last
    accepted: bool = False  # plan_run wrote _run.json: the run is on record

    def release(self) -> None:
        if self.inputs is not None:
            self.inputs.stop()
        if not self.accepted:  # refused: remove the lock file while it is still held, then its dirs
            remove_made(self.made)
        if self.lock is not None:
            self.lock.release()

    def saved(self) -> int:
        """How many of this shard's examples are in the results dir now."""
        try:
            stored = stored_examples(self.results_dir, expected=self.run_id)
        except UserError:
            return 0
        return sum(1 for e in self.mine if stored.get(e["example_id"], "") in (e["_key"], None))

    def interrupted(self) -> str:
        """What an interrupted run says: how much is saved, and the command line that resumes it."""
        where = self.run_dir if self.results_dir == self.run_dir / "results" else self.results_dir
        how = f"runner.results_dir={where} runner.shard={self.shard}"
        how = f"hydra.run.dir={where}" if where == self.run_dir else how
        return (
            f"interrupted: {self.saved()} of {len(self.mine)} examples saved in {self.results_dir}; "
            f"rerun the same command with {how} to resume"
        )


def _finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "metrics.json").read_text()).get("complete", True))
    except (OSError, ValueError):
        return False


def find_resumable(run_dir: Path, fingerprint: str) -> Path | None:
    """The newest sibling run dir with the same config and no complete metrics.json (an unfinished run)."""
    candidates = []
    for meta_path in run_dir.parent.glob(f"*/results/{META_NAME}"):
        other = meta_path.parent.parent
        if other == run_dir or _finished(other):
            continue
        try:
            if json.loads(meta_path.read_text())["fingerprint"] == fingerprint:
                candidates.append(other)
        except (OSError, ValueError, KeyError):
            continue
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def shard_examples(examples: list[dict], num_shards: int, shard: int) -> list[dict]:
    """The examples of one shard: those whose index in the dataset is shard modulo num_shards, so
    shards sharing a results dir write disjoint examples by construction."""
    return [e for i, e in enumerate(examples) if e.get("_index", i) % num_shards == shard]


def open_run(cfg: DictConfig, run_dir: Path) -> RunPlan:
    """Choose the results dir, refuse a different config, take the shard's lock. Touches nothing when
    it refuses (before the lock: reads only). Call before the model is loaded."""
    runner = cfg.runner
    num_shards, shard = int(runner.num_shards), int(runner.shard)
    fingerprint = config_fingerprint(cfg)
    if runner.get("results_dir"):
        results_dir = Path(str(runner.results_dir))
    else:
        results_dir = run_dir / "results"
        if runner.get("resume") and not (results_dir / META_NAME).exists():
            previous = find_resumable(run_dir, fingerprint)
            if previous is not None:
                log.info("resuming the unfinished run in %s", previous)
                run_dir, results_dir = previous, previous / "results"
    meta_path = results_dir / META_NAME
    if part_files(results_dir) and not meta_path.exists():
        recorded_run_id(results_dir)  # refuses: parts of an unknown run are never adopted
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {meta_path} ({exc}); choose another run dir (hydra.run.dir=...)") from exc
        if old.get("fingerprint") != fingerprint:
            diff = config_difference(old.get("config") or {}, OmegaConf.to_container(cfg, resolve=True))
            raise UserError(
                f"{results_dir} holds results of a different config "
                f"({diff or 'fingerprint ' + str(old.get('fingerprint'))}); "
                "choose another run dir (hydra.run.dir=...) or delete it"
            )
        if int(old.get("num_shards") or num_shards) != num_shards:
            raise UserError(
                f"{results_dir} was written with runner.num_shards={old.get('num_shards')}, not "
                f"{num_shards}; use the same number of shards or another results dir"
            )
    made = missing_dirs(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    lock = ShardLock(results_dir, shard)
    made += [] if lock.path.exists() else [lock.path]
    lock.acquire()  # refused: the file is another writer's, left alone
    for stale in results_dir.glob(f".part-{shard:03d}-*.tmp"):  # a kill between write and rename
        stale.unlink(missing_ok=True)
    from patchscan.models.fingerprints import Inputs

    inputs = Inputs().start()  # records the models loaded and maps fitted until plan.release()
    return RunPlan(run_dir, results_dir, shard=shard, num_shards=num_shards, lock=lock, inputs=inputs, made=made)


def missing_dirs(path: Path) -> list[Path]:
    """The dirs that creating `path` would make, shallowest first."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    return missing[::-1]


def remove_made(made: list[Path]) -> None:
    """Undo what a refused run created (its lock file, then its dirs while they are empty), so that it
    leaves the filesystem as it found it."""
    for path in reversed(made):
        try:
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        except OSError:
            return  # not empty (another process writes there) or not ours to remove


def plan_run(plan: RunPlan, examples: list[dict], meta: dict, repair: bool = False) -> RunPlan:
    """Key every example by content, keep this shard's, compare the run identity and the examples
    with what is stored, write _run.json."""
    meta_path = plan.results_dir / META_NAME
    identity = run_identity(meta, plan.inputs)
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None

    def refuse_other(parts: tuple[str, ...]) -> None:
        if old is not None and (diff := identity_difference(old.get("identity"), identity, parts)):
            raise UserError(
                f"{plan.results_dir} holds results of another run ({diff}); choose another run dir "
                "(hydra.run.dir=...) or delete it"
            )

    refuse_other(("config", "models"))
    keys = {}
    for i, example in enumerate(examples):
        example.setdefault("_index", i)
        example["_key"] = example_key(example)
        keys[example["example_id"]] = example["_key"]
    stored = stored_examples(plan.results_dir, repair, expected=old.get("run_id") if old else None)
    for example_id, key in stored.items():
        if example_id not in keys:
            raise UserError(
                f"{plan.results_dir} holds example {example_id!r}, which the dataset no longer gives "
                "(the data changed since those results were written); choose another run dir "
                "(hydra.run.dir=...)"
            )
        if key is not None and key != keys[example_id]:
            raise UserError(
                f"{plan.results_dir} holds example {example_id!r} computed from other data (its text, "
                "token ids or answer changed since); choose another run dir (hydra.run.dir=...)"
            )
    refuse_other(("data", "maps"))  # after the examples: a changed example is named first
    plan.run_id = run_id(identity)
    meta = {**meta, "n_examples": len(examples), "identity": identity, "run_id": plan.run_id}
    write_atomic(meta_path, json.dumps(strict_json(meta), indent=1))
    plan.accepted = True
    plan.mine = shard_examples(examples, plan.num_shards, plan.shard)
    plan.todo = [e for e in plan.mine if e["example_id"] not in stored]
    plan.skipped = len(plan.mine) - len(plan.todo)
    return plan


# ---------------------------------------------------------------- execute


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file) one plain line at most every few seconds."""

    def __init__(self, total: int, desc: str, stream=None, interval: float = PROGRESS_INTERVAL_S):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.interval = total, desc, interval
        self.done = self.runs = 0
        self.start = self.last = time.monotonic()
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = None
        if isatty:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=desc, unit="example", dynamic_ncols=True, file=self.stream, mininterval=1.0
            )

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        rate = self.done / (now - self.start) if now > self.start else 0.0
        print(
            f"{self.desc}: {self.done}/{self.total} examples, {self.runs} patched runs, "
            f"{now - self.start:.0f} s ({rate:.2f} examples/s)",
            file=self.stream,
            flush=True,
        )

    def add_runs(self, n: int) -> None:
        self.runs += n
        if self.bar is not None:
            self.bar.set_postfix(runs=self.runs)
        else:
            self._line()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            self._line(final=True)


def with_keys(df: pd.DataFrame, chunk: list[dict]) -> pd.DataFrame:
    """Add example_key and make layer and position columns integers (nullable where some rows have none)."""
    df = int_columns(df)
    keys = {e["example_id"]: e["_key"] for e in chunk}
    df["example_key"] = df["example_id"].map(keys)
    return df


def execute(
    plan: RunPlan,
    run_chunk: Callable[[list[dict], Callable[[int], None]], pd.DataFrame],
    examples_per_part: int,
    desc: str,
    view=None,
    setup: Counts | None = None,
    target_view=None,
) -> None:
    """Run the examples chunk by chunk, writing one Parquet part per chunk, with progress.

    With the model's `view` (and cross_model's `target_view`), each chunk's model work is counted
    into `results/_shard-SSS.json`.
    """
    from patchscan.engine.counting import count_work
    from patchscan.runs.worklog import ShardLog

    if plan.skipped:
        log.info("resume: %d examples already done in %s, %d to run", plan.skipped, plan.results_dir, len(plan.todo))
    progress = Progress(len(plan.todo), desc)
    work = ShardLog(plan.results_dir, plan.shard, plan.num_shards, plan.skipped, setup)
    try:
        for start in range(0, len(plan.todo), examples_per_part):
            chunk = plan.todo[start : start + examples_per_part]
            with count_work(*(None if v is None else v.model for v in (view, target_view))) as counts:
                df = with_keys(run_chunk(chunk, progress.add_runs), chunk)
            name = f"part-{plan.shard:03d}-{chunk[0]['_index']:07d}.parquet"
            write_part(df, plan.results_dir, name, plan.run_id)
            work.add_chunk(name, len(chunk), counts)
            progress.update(len(chunk))
            hold_after_part(plan.shard)
    finally:
        progress.close()
    work.finish("cpu" if view is None else view.device)


HOLD_DIR = "PATCHSCAN_HOLD_DIR"


def hold_after_part(shard: int) -> None:
    """A barrier for preemption tests: after each part it writes, shard SSS waits while the file
    `$PATCHSCAN_HOLD_DIR/shard-SSS` exists, so a test can cancel or time out a job at a known point
    (between two parts) on any machine, however fast. Unset (the normal case), it costs one lookup."""
    folder = os.environ.get(HOLD_DIR)
    if not folder:
        return
    flag = Path(folder) / f"shard-{shard:03d}"
    while flag.exists():
        time.sleep(0.05)


def finalize(scope_cls, cfg, out_dir: Path, results_dir: Path, quiet: bool = False) -> dict:
    """metrics.json, plots and the printed table, from the Parquet results alone, into out_dir."""
    if results_dir.resolve() in (out_dir.resolve(), *out_dir.resolve().parents):
        raise UserError(f"metrics and figures go beside the results dir, never into it: {out_dir} is in {results_dir}")
    df = read_results(results_dir)
    _, meta = run_meta(results_dir)
    stored, expected = df["example_id"].nunique(), meta.get("n_examples")
    metrics = scope_cls.metrics(df, cfg)
    metrics["complete"] = expected is None or stored >= expected
    metrics["examples_stored"], metrics["examples_expected"] = int(stored), expected
    metrics["dropped"] = meta.get("dropped") or {}  # inputs left out, by reason (patchscan.data.drops)
    out_dir.mkdir(parents=True, exist_ok=True)
    for png in scope_cls.plot(df, metrics, out_dir):
        metrics.setdefault("figures", []).append(str(png))
    write_atomic(out_dir / "metrics.json", json.dumps(strict_json(metrics), indent=1, allow_nan=False))
    report = scope_cls.report(metrics)
    if report and not quiet:
        print(report)
    print(f"results: {results_dir}\nmetrics: {out_dir / 'metrics.json'}")
    for png in metrics.get("figures", []):
        print(f"figure:  {png}")
    if not metrics["complete"]:
        print(
            f"patchscan: warning: partial metrics: {stored} of {expected} examples are in {results_dir} "
            '(the run or another shard is unfinished); metrics.json says "complete": false',
            file=sys.stderr,
        )
    return metrics
