"""A results dir's part files: the one reader (each part checked: readable, stamped with the run's
id, no example twice), the one part writer (atomic, stamped), and the run dir's _run.json."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from patchscan.errors import UserError
from patchscan.runs.store import write_atomic

log = logging.getLogger(__name__)
META_NAME = "_run.json"  # starts with "_" so Parquet readers ignore it
QUARANTINE = ".quarantine"  # where runner.repair=true moves bad parts
RUN_ID_KEY = b"patchscan.run_id"  # Parquet schema metadata: the run identity a part belongs to


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
