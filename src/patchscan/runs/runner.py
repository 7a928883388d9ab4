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

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from patchscan.errors import UserError
from patchscan.runs.row_schema import int_columns
from patchscan.runs.store import write_atomic  # noqa: F401 - the one atomic writer, also runner.write_atomic

if TYPE_CHECKING:
    from patchscan.engine.counting import Counts
    from patchscan.models.fingerprints import Inputs

log = logging.getLogger(__name__)
META_NAME = "_run.json"  # starts with "_" so Parquet readers ignore it
LOCK_PREFIX = ".lock-shard-"  # starts with "." so Parquet readers ignore it
QUARANTINE = ".quarantine"  # where runner.repair=true moves bad parts
# example fields that are results of the model, not its definition (left out of example_key)
DERIVED_FIELDS = ("probe", "filled_generation", "filled_correct")
PROGRESS_INTERVAL_S = 5.0
RUN_ID_KEY = b"patchscan.run_id"  # Parquet schema metadata: the run identity a part belongs to


# ---------------------------------------------------------------- config identity


def _identity_config(cfg: DictConfig | dict) -> dict:
    """The part of a config that decides the results: all but how they are batched, sharded, resumed."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    runner = data.pop("runner", None) or {}
    data.pop("hydra", None)
    data["seed"] = runner.get("seed", 0)  # runner.seed picks positions and probe folds
    return data


def config_fingerprint(cfg: DictConfig | dict) -> str:
    """A hash of everything that decides the results (not how they are batched or sharded)."""
    blob = json.dumps(_identity_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_difference(old: dict, new: dict) -> str | None:
    """The first key (dotted) whose value differs between two configs' identities, as 'key: a there, b here'."""

    def walk(a: Any, b: Any, prefix: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                found = walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
                if found:
                    return found
            return None
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            name = "runner.seed" if prefix == "seed" else prefix
            return f"{name}={json.dumps(a, default=str)} there, {json.dumps(b, default=str)} here"
        return None

    return walk(_identity_config(old), _identity_config(new), "")


IDENTITY_PARTS = {  # what a run's identity holds, in the order a difference is reported
    "config": "the config",
    "models": "model weights",
    "data": "data",
    "maps": "fitted maps",
}


def run_identity(meta: dict, inputs: Inputs | None = None) -> dict:
    """Everything that determines a row beyond the example itself: the config, the exact fingerprint
    of every model loaded, the digest of every data file the config names, and the key of every set
    of maps fitted or loaded (`fingerprints.Inputs`, recorded while the run was set up)."""
    from patchscan.models.fingerprints import data_fingerprint

    models = dict(inputs.models) if inputs is not None else {}
    model = meta.get("model") or {}
    if model.get("fingerprint") and model["fingerprint"] not in models.values():
        models[model.get("name") or "model"] = model["fingerprint"]
    return {
        "config": meta.get("fingerprint") or config_fingerprint(meta["config"]),
        "models": models,
        "data": data_fingerprint(_identity_config(meta.get("config") or {})),
        "maps": dict(inputs.maps) if inputs is not None else {},
    }


def run_id(identity: dict) -> str:
    """The short hash of a run identity that every part of the run carries."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def identity_difference(old: dict | None, new: dict, parts: tuple[str, ...] = tuple(IDENTITY_PARTS)) -> str | None:
    """What differs between two run identities (among `parts`), as one phrase naming the first change."""
    if not old:
        return "it was written without a run identity (by an older patchscan)"
    for part in parts:
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if not isinstance(a, dict) or not isinstance(b, dict):
            return f"{IDENTITY_PARTS[part]}: {a} there, {b} here"
        name = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        if name not in b:
            return f"{IDENTITY_PARTS[part]}: {name} was used there, not here"
        if name not in a:
            return f"{IDENTITY_PARTS[part]}: {name} is used here, not there"
        return f"{IDENTITY_PARTS[part]}: {name} changed (digest {a[name]} there, {b[name]} here)"
    return None


def example_key(example: dict) -> str:
    """A short hash of what defines an example (all its fields but private and model-derived ones)."""
    content = {k: v for k, v in example.items() if not k.startswith("_") and k not in DERIVED_FIELDS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- files


def strict_json(value: Any) -> Any:
    """NaN and infinities become null, numpy scalars plain numbers: json.dumps(allow_nan=False) then passes."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def part_files(results_dir: Path) -> list[Path]:
    return sorted(results_dir.glob("part-*.parquet"))


def check_parts(results_dir: Path, repair: bool = False) -> list[Path]:
    """The readable part files; an empty, truncated or unreadable one is one error line (or, with
    repair, moved to results/.quarantine/ so its examples are computed again)."""
    good = []
    for part in part_files(results_dir):
        problem = None
        try:
            meta = pq.ParquetFile(part).metadata
            if meta.num_rows == 0:
                problem = "is empty"
            elif "example_id" not in meta.schema.names:
                problem = "has no example_id column"
        except Exception as exc:  # pyarrow raises several types for a damaged file
            problem = f"is truncated or unreadable ({str(exc).splitlines()[0][:120]})"
        if problem is None:
            good.append(part)
        elif repair:
            _set_aside(results_dir, part, f"it {problem}")
        else:
            raise UserError(
                f"part file {part} {problem}; rerun with runner.repair=true to move it aside and recompute its examples"
            )
    return good


def _set_aside(results_dir: Path, part: Path, problem: str) -> None:
    aside = results_dir / QUARANTINE
    aside.mkdir(exist_ok=True)
    os.replace(part, aside / part.name)
    log.warning("runner.repair: moved %s (%s) to %s; its examples run again", part.name, problem, aside)


def recorded_run_id(results_dir: Path) -> str:
    """The run id in a results dir's _run.json; one error line when there is none to check parts against."""
    meta_path = results_dir / META_NAME
    if not meta_path.is_file():
        raise UserError(
            f"{results_dir} holds part files but no {META_NAME}: which run wrote them is unknown, so they are "
            "not adopted; move them away or choose another run dir (hydra.run.dir=...)"
        )
    try:
        found = json.loads(meta_path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"cannot read {meta_path}: {exc}") from exc
    if not found:
        raise UserError(f"{meta_path} has no run identity (written by an older patchscan); rerun into a new run dir")
    return found


def run_parts(results_dir: Path, expected: str | None = None, repair: bool = False) -> dict[Path, dict[str, str]]:
    """The one reader of a results dir's parts: part -> {example_id: example_key}, each part checked:
    readable, stamped with the run id of `_run.json` (or `expected`), and no example in two parts.
    Anything else is one error line (with repair: the part is moved to .quarantine/ and its examples
    run again). resume, eval, show and finalize all read through here."""
    parts = check_parts(results_dir, repair)
    if not parts:
        return {}
    expected = expected or recorded_run_id(results_dir)
    out: dict[Path, dict[str, str]] = {}
    owner: dict[str, Path] = {}
    for part in parts:
        stamp = (pq.read_schema(part).metadata or {}).get(RUN_ID_KEY, b"").decode() or None
        table = pq.read_table(
            part, columns=[c for c in ("example_id", "example_key") if c in pq.read_schema(part).names]
        )
        ids = table.column("example_id").to_pylist()
        twice = next((i for i in ids if i in owner), None)
        if stamp != expected:
            problem = f"belongs to another run (run id {stamp}, this results dir's is {expected})"
        elif twice is not None:
            problem = f"repeats example {twice!r} of {owner[twice].name} (a part copied in twice?)"
        else:
            keys = table.column("example_key").to_pylist() if "example_key" in table.column_names else [None] * len(ids)
            out[part] = dict(zip(ids, keys))
            owner.update(dict.fromkeys(ids, part))
            continue
        if not repair:
            raise UserError(
                f"part file {part} {problem}; move it out, or rerun with runner.repair=true to set it aside"
            )
        _set_aside(results_dir, part, problem)
    return out


def stored_examples(results_dir: Path, repair: bool = False, expected: str | None = None) -> dict[str, str | None]:
    """example_id -> example_key of the examples written in a results dir (checked: `run_parts`)."""
    done: dict[str, str | None] = {}
    for examples in run_parts(results_dir, expected, repair).values():
        done.update(examples)
    return done


def write_part(df: pd.DataFrame, results_dir: Path, name: str, run_id: str) -> Path:
    """Write atomically (`store.write_atomic`), stamped with the run's id in the Parquet schema
    metadata, so every reader can tell the run's own parts from others. Never an empty part."""
    import pyarrow as pa

    if df.empty:
        raise RuntimeError(f"refusing to write an empty part {name}: the scope returned no rows")
    schema = pa.Schema.from_pandas(df, preserve_index=False)
    schema = schema.with_metadata({**(schema.metadata or {}), RUN_ID_KEY: run_id.encode()})
    return write_atomic(results_dir / name, lambda tmp: df.to_parquet(tmp, index=False, schema=schema))


def run_config(run_dir: str | Path) -> tuple[Path, dict]:
    """The results dir of a run dir (or of a results dir itself) and the config the run was composed with."""
    results_dir, meta = run_meta(run_dir)
    return results_dir, meta["config"]


def run_meta(run_dir: str | Path) -> tuple[Path, dict]:
    run_dir = Path(run_dir)
    results_dir = run_dir if (run_dir / META_NAME).is_file() else run_dir / "results"
    meta = results_dir / META_NAME
    if not meta.is_file():
        raise UserError(f"{run_dir} is not a patchscan run dir or results dir (no {META_NAME})")
    try:
        return results_dir, json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {meta}: {exc}") from exc


def read_results(run_dir: str | Path) -> pd.DataFrame:
    """All rows of a run dir (or of a results dir itself): its part files only, whatever else lies there."""
    run_dir = Path(run_dir)
    results = run_dir / "results" if (run_dir / "results").is_dir() else run_dir
    parts = run_parts(results)
    if not parts:
        raise UserError(f"no results found in {results}")
    return pads.dataset([str(p) for p in parts], format="parquet").to_table().to_pandas()


def git_commit() -> str | None:
    """The commit of the patchscan checkout this code runs from; None for an installed package or
    without git. Only a repository whose top level is the checkout counts, never one that merely
    contains the installed package (a venv inside some project) or the working directory."""
    import patchscan

    root = Path(patchscan.__file__).resolve().parents[2]  # src/patchscan/__init__.py -> the checkout
    if not (root / "pyproject.toml").is_file() or not (root / "src" / "patchscan").is_dir():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) != 2 or Path(out[0]).resolve() != root:
        return None
    return out[1]


def run_metadata(cfg: DictConfig, view=None, n_examples: int | None = None) -> dict[str, Any]:
    import torch
    import transformers

    meta: dict[str, Any] = {
        "experiment": cfg.experiment.name,
        "fingerprint": config_fingerprint(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "n_examples": n_examples,
        "num_shards": int(cfg.runner.num_shards),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "pandas": pd.__version__},
    }
    from patchscan import __version__

    meta["versions"]["patchscan"] = __version__
    meta["git_commit"] = git_commit()
    if view is not None:
        from patchscan.models.fingerprints import model_fingerprint

        meta["model"] = {
            "name": view.name,
            "class": type(view.model).__name__,
            "dtype": str(view.dtype),
            "device": str(view.device),
            "n_blocks": view.n_blocks,
            "width": view.width,
            "fingerprint": model_fingerprint(view),
            "revision": cfg.model.get("revision"),
            "id": cfg.model.get("id") or cfg.model.get("path"),
        }
    return meta


# ---------------------------------------------------------------- locks


class ShardLock:
    """flock on results/.lock-shard-SSS, held for the whole run; the file names the holder.

    The kernel drops the lock when its process dies (SIGKILL included), so a rerun after a crash
    takes it at once. A refused run writes nothing into the file.
    """

    def __init__(self, results_dir: Path, shard: int):
        self.path = results_dir / f"{LOCK_PREFIX}{shard:03d}"
        self.shard = shard
        self.fh = None

    def acquire(self) -> ShardLock:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(
                f"{self.path.parent} (shard {self.shard}) is being written by {holder}; wait for it "
                "to finish, or write elsewhere (hydra.run.dir=... or runner.results_dir=...)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


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
