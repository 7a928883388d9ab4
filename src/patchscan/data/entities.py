"""Entities with reference descriptions: the built-in list, or a CSV/TSV/JSONL file."""

from __future__ import annotations

import csv
from pathlib import Path

from patchscan.data.texts import BUILTIN_DIR, read_jsonl
from patchscan.errors import UserError


def load_entities(path: str | None) -> list[dict]:
    """Records with `name`, `description` and `popularity` (popular / obscure / unknown)."""
    if not path:
        file = BUILTIN_DIR / "entities.tsv"
    else:
        file = Path(str(path)).expanduser()
        if not file.is_file():
            raise UserError(f"entity file not found: {file}")
    if file.suffix == ".jsonl":
        records = read_jsonl(file)
    else:
        try:
            with file.open(encoding="utf-8-sig", newline="") as fh:
                records = list(csv.DictReader(fh, delimiter="\t" if file.suffix == ".tsv" else ","))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"cannot read entity file {file}: {exc}") from exc
    out = []
    for n, r in enumerate(records, 1):
        if not r.get("name") or not r.get("description"):
            raise UserError(f"{file}: record {n} needs 'name' and 'description'")
        bad = next(
            (k for k in ("name", "description", "popularity") if r.get(k) is not None and not isinstance(r[k], str)),
            None,
        )
        if bad:
            raise UserError(f"{file}: record {n} has {bad}={r[bad]!r}; it must be text (in quotes in JSON)")
        out.append(
            {
                "name": r["name"].strip(),
                "description": r["description"].strip(),
                "popularity": (r.get("popularity") or "unknown").strip(),
            }
        )
    if not out:
        raise UserError(f"the entity file {file} is empty")
    return out
