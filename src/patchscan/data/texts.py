"""Texts for next-token experiments: a UTF-8 file (one text per line), JSONL, the built-in
set the team wrote, or a Hugging Face dataset for users who have the hub."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from patchscan.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"


def read_lines(path: str | Path, what: str = "data file") -> list[str]:
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    for n, line in enumerate(read_lines(path, "JSONL file"), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {n} is not a JSON object")
        records.append(record)
    return records


def _text_file(cfg: Mapping[str, Any]) -> list[str]:
    if not cfg.get("path"):
        raise UserError("dataset=text needs dataset.path=FILE (one text per line)")
    return read_lines(cfg["path"])


def _builtin(cfg: Mapping[str, Any]) -> list[str]:
    name = cfg.get("name", "texts")
    path = BUILTIN_DIR / f"{name}.txt"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.txt")))
        raise UserError(f"unknown built-in text set {name!r}; choose from {choices}")
    return read_lines(path)


def _jsonl(cfg: Mapping[str, Any]) -> list[str]:
    field = cfg.get("field", "text")
    records = read_jsonl(cfg.get("path") or "")
    missing = [i for i, r in enumerate(records, 1) if not isinstance(r.get(field), str)]
    if missing:
        raise UserError(f"{cfg['path']}: line {missing[0]} has no text field {field!r}")
    return [r[field] for r in records]


def _hf(cfg: Mapping[str, Any]) -> list[str]:
    try:
        import datasets  # optional: only for users who have the hub
    except ImportError as exc:
        raise UserError("dataset=hf needs the `datasets` package: pip install datasets") from exc
    ds = datasets.load_dataset(cfg["name"], cfg.get("config"), split=cfg.get("split", "train"), streaming=True)
    texts = []
    for record in ds:
        texts.append(record[cfg.get("field", "text")])
        if len(texts) >= int(cfg.get("limit") or 1000) * 2:
            break
    return texts


READERS = {"text": _text_file, "builtin": _builtin, "jsonl": _jsonl, "hf": _hf}
KINDS = tuple(READERS)


def load_texts(cfg: Mapping[str, Any]) -> list[str]:
    """The texts of a dataset config (configs/dataset/*.yaml), before `limit`."""
    kind = cfg.get("kind", "text")
    if kind not in READERS:
        raise UserError(f"unknown dataset kind {kind!r}; choose from {', '.join(KINDS)}")
    texts = READERS[kind](cfg)
    if not texts:
        raise UserError(f"the dataset ({cfg.get('path') or cfg.get('name')}) is empty")
    return texts
