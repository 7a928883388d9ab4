"""The one atomic writer: a file (or folder) appears whole under its name, or not at all.

Everything patchscan writes that a later run reads (Parquet parts, `_run.json`, shard logs,
metrics.json, fitted maps, the converted built-in model, digest caches) goes through
`write_atomic`: the content is written to a hidden temporary name in the same folder, unique to
the process and the call (pid and random), synced to disk, then renamed over the target. A kill
or a full disk leaves the old file whole; two processes writing the same name never share a
temporary file.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call: .NAME.PID.RANDOM.tmp"""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _sync(tmp: Path) -> None:
    files = [tmp] if tmp.is_file() else [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    for file in files:
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write `content` (text, bytes, or a function that writes a file or folder at the path it is
    given) to `path` atomically: temporary name, fsync, os.replace. Returns `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        _sync(tmp)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path
