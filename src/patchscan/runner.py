"""Examples -> chunks -> scope -> rows -> Parquet parts, with resume, shards and progress.

Each part file holds all rows of a chunk of examples and is written to a hidden temporary
name, then renamed, so a killed run leaves only complete parts. A rerun into the same
results directory reads which examples are done and skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd
import pyarrow.dataset as pads
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from patchscan.errors import UserError

if TYPE_CHECKING:
    from patchscan.engine.counting import Counts

log = logging.getLogger(__name__)
META_NAME = "_run.json"  # starts with "_" so Parquet readers ignore it


def config_fingerprint(cfg: DictConfig) -> str:
    """A hash of everything that decides the results (not how they are batched or sharded)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("runner", None)
    data.pop("hydra", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def done_examples(results_dir: Path) -> set[str]:
    parts = sorted(results_dir.glob("part-*.parquet"))
    if not parts:
        return set()
    table = pads.dataset([str(p) for p in parts], format="parquet").to_table(columns=["example_id"])
    return set(table.column("example_id").to_pylist())


def write_part(df: pd.DataFrame, results_dir: Path, name: str) -> Path:
    """Write atomically: a hidden temporary file, fsync, then rename."""
    path = results_dir / name
    tmp = results_dir / f".{name}.tmp"
    df.to_parquet(tmp, index=False)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def run_config(run_dir: str | Path) -> tuple[Path, dict]:
    """The results dir of a run dir (or of a results dir itself) and the config the run was composed with."""
    run_dir = Path(run_dir)
    results_dir = run_dir if (run_dir / META_NAME).is_file() else run_dir / "results"
    meta = results_dir / META_NAME
    if not meta.is_file():
        raise UserError(f"{run_dir} is not a patchscan run dir or results dir (no {META_NAME})")
    return results_dir, json.loads(meta.read_text())["config"]


def read_results(run_dir: str | Path) -> pd.DataFrame:
    """All rows of a run dir (or of a results dir itself)."""
    run_dir = Path(run_dir)
    results = run_dir / "results" if (run_dir / "results").is_dir() else run_dir
    parts = sorted(results.glob("part-*.parquet"))
    if not parts:
        raise UserError(f"no results found in {results}")
    return pd.read_parquet(results)


def run_metadata(cfg: DictConfig, view=None) -> dict[str, Any]:
    import torch
    import transformers

    meta: dict[str, Any] = {
        "experiment": cfg.experiment.name,
        "fingerprint": config_fingerprint(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "pandas": pd.__version__},
    }
    try:
        from patchscan import __version__

        meta["versions"]["patchscan"] = __version__
        root = Path(__file__).resolve().parents[2]
        meta["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        meta["git_commit"] = None
    if view is not None:
        meta["model"] = {"name": view.name, "class": type(view.model).__name__, "dtype": str(view.dtype),
                         "device": str(view.device), "n_blocks": view.n_blocks, "width": view.width,
                         "revision": cfg.model.get("revision"), "id": cfg.model.get("id") or cfg.model.get("path")}
    return meta


@dataclass
class RunPlan:
    """Where results go and which examples are left to run."""

    run_dir: Path
    results_dir: Path
    todo: list[dict]
    skipped: int
    shard: int = 0
    num_shards: int = 1
    extra: dict = field(default_factory=dict)


def find_resumable(run_dir: Path, fingerprint: str) -> Path | None:
    """The newest sibling run dir with the same config and no metrics.json (an unfinished run)."""
    candidates = []
    for meta_path in run_dir.parent.glob(f"*/results/{META_NAME}"):
        other = meta_path.parent.parent
        if other == run_dir or (other / "metrics.json").exists():
            continue
        try:
            if json.loads(meta_path.read_text())["fingerprint"] == fingerprint:
                candidates.append(other)
        except (OSError, ValueError, KeyError):
            continue
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def shard_examples(examples: list[dict], num_shards: int, shard: int) -> list[dict]:
    """The examples of one shard: every num_shards-th, from the shard's index on."""
    return [e for i, e in enumerate(examples) if i % num_shards == shard]


def plan_run(cfg: DictConfig, run_dir: Path, examples: list[dict], meta: dict) -> RunPlan:
    runner = cfg.runner
    num_shards, shard = int(runner.num_shards), int(runner.shard)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise UserError(f"runner.shard={shard} is out of range for runner.num_shards={num_shards}")
    if runner.get("results_dir"):
        results_dir = Path(runner.results_dir)
    else:
        results_dir = run_dir / "results"
        if runner.get("resume") and not (results_dir / META_NAME).exists():
            previous = find_resumable(run_dir, meta["fingerprint"])
            if previous is not None:
                log.info("resuming the unfinished run in %s", previous)
                run_dir, results_dir = previous, previous / "results"
    meta_path = results_dir / META_NAME
    if meta_path.exists():
        old = json.loads(meta_path.read_text()).get("fingerprint")
        if old != meta["fingerprint"]:
            raise UserError(f"{results_dir} holds results of a different config (fingerprint {old}); "
                            "choose another run dir (hydra.run.dir=...) or delete it")
    results_dir.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    mine = shard_examples(examples, num_shards, shard)
    done = done_examples(results_dir)
    todo = [e for e in mine if e["example_id"] not in done]
    return RunPlan(run_dir, results_dir, todo, len(mine) - len(todo), shard, num_shards)


def execute(plan: RunPlan, run_chunk: Callable[[list[dict], Callable[[int], None]], pd.DataFrame],
            examples_per_part: int, desc: str, view=None, setup: Counts | None = None) -> None:
    """Run the examples chunk by chunk, writing one Parquet part per chunk, with a progress bar.

    With the model's `view`, each chunk's model work is counted into `results/_shard-SSS.json`.
    """
    from patchscan.engine.counting import count_work
    from patchscan.worklog import ShardLog

    if plan.skipped:
        log.info("resume: %d examples already done in %s, %d to run", plan.skipped, plan.results_dir, len(plan.todo))
    bar = tqdm(total=len(plan.todo), desc=desc, unit="example", dynamic_ncols=True,
               disable=None if sys.stderr.isatty() else False, mininterval=1.0)
    runs = [0]

    def progress(n: int) -> None:  # patched runs inside a chunk, so long chunks show life
        runs[0] += n
        bar.set_postfix(runs=runs[0])

    work = ShardLog(plan.results_dir, plan.shard, plan.num_shards, plan.skipped, setup)
    with bar:
        for start in range(0, len(plan.todo), examples_per_part):
            chunk = plan.todo[start:start + examples_per_part]
            with count_work(None if view is None else view.model) as counts:
                df = run_chunk(chunk, progress)
            name = f"part-{plan.shard:03d}-{chunk[0]['_index']:07d}.parquet"
            write_part(df, plan.results_dir, name)
            work.add_chunk(name, len(chunk), counts)
            bar.update(len(chunk))
    work.finish("cpu" if view is None else view.device)
