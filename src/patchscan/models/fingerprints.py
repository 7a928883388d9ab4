"""Identities by content: a loaded model's exact weight fingerprint, the digest of data files,
the key of a set of fitted maps, and what a run used (models and maps), recorded as it runs.

A fitted map or a row depends on the weights (not on the config's name: `model.seed=1`, a local
folder or a GGUF under a default name, a hub revision, one edited embedding row all change them),
the dtype, the data, the token ids, the settings and the fitting code. Every identity here is
exact: any change of any weight or data byte changes it (SHA-256 over all of it, never a sample).

What an exact weight identity costs (measured 2026-12-02 on this project's 2-core Xeon with SHA-NI,
shared with other jobs; `python /tmp/identity/measure.py`, the built-in smollm2_135m, 538 MB fp32):

- SHA-256 over every tensor's bytes in memory: 1.0 s (0.52 GB/s; blake2b 0.24 GB/s, sha1 0.41 GB/s);
- SHA-256 of the model's files (a 542 MB folder, from the page cache): 1.6 s (0.34 GB/s), once per
  file version: the digest is cached by (path, size, mtime_ns, ctime_ns, inode), so later loads
  pay one stat per file (0.07 ms for the folder's six files);
- the sampled fingerprint this replaces (4,096 values per tensor): 0.08 s, and blind to most edits.

For a 13B model (26 GB in fp16) that is about 26 / 0.34 = 76 s for the first file hash, then ~0 s
on every later run; the in-memory hash would be 26 / 0.52 = 50 s on one such core (hashlib releases
the GIL, so `_tensor_digests` spreads tensors over threads: about 26 / (0.5 x cores) s), plus the
copy from the GPU to the host (26 GB over PCIe at ~20 GB/s, ~1.3 s). An on-device reduction (e.g.
position-weighted sums of the raw words, at the GPU's memory bandwidth: ~10 ms for 26 GB on an H200)
would make the in-memory case nearly free, at the price of a checksum instead of a cryptographic
hash; it is not built.

So: a model loaded from files (built-in, folder, GGUF, hub snapshot, a tiny model dispatched through
a folder) is identified by its files' digests, cached, as long as its tensors are untouched since the
load (their version counters and storage, checked on each call; a change falls back to the in-memory
hash); any other model (tiny, wrapped in a `ModelView` by hand) by the in-memory SHA-256 of every
tensor and its tokenizer. Either is computed once per view. Writes through `tensor.data` bypass the
version counters: a file-backed view edited that way must be reloaded (or `forget(view)` called).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIT_VERSION = 2  # bump when the fitting code changes what it produces
DIGESTS_NAME = "file-digests.json"  # in the cache root: file -> (stat, sha256)
_FILES_ATTR = "_patchscan_weight_files"  # set on a model loaded from files: (paths, tensor state at load)
_VIEW_ATTR = "_patchscan_fingerprint"
# config groups whose files are not data: the models are identified by their weights
NOT_DATA = ("model", "target_model", "runner", "hydra")
DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv")


# ---------------------------------------------------------------- files


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


_MEMORY: dict[str, tuple[list[int], str]] = {}


def _digest_cache() -> Path | None:
    from patchscan.paths import cache_root

    return cache_root() / DIGESTS_NAME


def _load_digests(path: Path | None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_digests(path: Path | None, fresh: dict[str, tuple[list[int], str]]) -> None:
    """Add `fresh` to the on-disk cache (entries of files that changed or went are dropped)."""
    from patchscan.runs.store import write_atomic

    if path is None or not fresh:
        return
    data = _load_digests(path)
    data.update({k: [*v[0], v[1]] for k, v in fresh.items()})
    kept = {}
    for name, entry in data.items():
        try:
            if list(entry[:4]) == _stat_key(Path(name)):
                kept[name] = entry
        except (OSError, TypeError, ValueError):
            continue
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(kept, indent=0))
    except OSError as exc:  # a read-only cache: the digests are computed again next time
        log.debug("cannot save file digests in %s: %s", path, exc)


def _sha256_of(path: Path, chunk: int = 1 << 23) -> str:
    h, buffer = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def file_digests(paths: Iterable[str | Path]) -> dict[str, str]:
    """resolved path -> SHA-256 of the file's bytes, cached by (size, mtime_ns, ctime_ns, inode)."""
    cache_file, stored, out, fresh = None, None, {}, {}
    for raw in paths:
        path = Path(raw).resolve()
        name, stat = str(path), _stat_key(path)
        hit = _MEMORY.get(name)
        if hit is None or hit[0] != stat:
            if stored is None:
                cache_file = _digest_cache()
                stored = _load_digests(cache_file)
            entry = stored.get(name)
            if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stat:
                hit = (stat, entry[4])
            else:
                hit = (stat, _sha256_of(path))
                fresh[name] = hit
            _MEMORY[name] = hit
        out[name] = hit[1]
    _save_digests(cache_file, fresh)
    return out


def _files_of(path: Path, recursive: bool) -> list[Path]:
    if path.is_file():
        return [path]
    found = path.rglob("*") if recursive else path.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def path_digest(path: str | Path, recursive: bool = True) -> str:
    """SHA-256 of a file, or of a folder's files (names relative to it, sorted, and their digests)."""
    path = Path(path).expanduser()
    files = _files_of(path, recursive)
    digests = file_digests(files)
    h = hashlib.sha256()
    for file in files:
        h.update(f"{file.relative_to(path) if file != path else file.name}|{digests[str(file.resolve())]}\n".encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------- models


def _tensor_state(model) -> list[tuple[str, int, int]]:
    """(name, storage pointer, version counter) of every tensor: changes on any in-place write or swap."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t.data_ptr() if t.device.type != "meta" else 0, t._version) for n, t in named]


def set_weight_files(model, paths: Iterable[str | Path]) -> None:
    """Mark a model as loaded from these files (a folder's top-level files count, or a single file)."""
    model.__dict__[_FILES_ATTR] = ([Path(p) for p in paths], _tensor_state(model))


def forget(view) -> None:
    """Drop a view's cached fingerprint and its files (after editing weights through `tensor.data`)."""
    view.__dict__.pop(_VIEW_ATTR, None)
    view.model.__dict__.pop(_FILES_ATTR, None)


def _header(view):
    model = view.model
    h = hashlib.sha256(type(model).__name__.encode())
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
    return h


def _tensor_digest(tensor) -> str:
    import torch

    if tensor.device.type == "meta":
        return "meta"
    with torch.no_grad():
        raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().data).hexdigest()


def _tensor_digests(model) -> list[str]:
    """SHA-256 of every parameter's and buffer's bytes, in a fixed order (threads: hashlib frees the GIL)."""
    tensors = [t for _, t in list(model.named_parameters()) + list(model.named_buffers())]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_tensor_digest, tensors))
    meta = digests.count("meta")
    if meta:
        log.warning("%d offloaded tensors (on the meta device) count by name and shape only in the fingerprint", meta)
    return digests


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()), default=str)
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + specials).encode()).hexdigest()


def _files_unchanged(model) -> list[Path] | None:
    """The model's weight files, if it was loaded from files and no tensor has changed since."""
    marked = model.__dict__.get(_FILES_ATTR)
    if not marked:
        return None
    paths, state = marked
    if _tensor_state(model) != state:
        log.info("weights changed in memory since they were loaded: fingerprinting the tensors")
        return None
    return paths


def model_fingerprint(view) -> str:
    """An exact identity of the loaded model: its architecture config, the names, shapes and dtypes
    of its tensors, and either its weight files' digests (loaded from files and untouched since) or
    every tensor's bytes and its tokenizer. Computed once per view (see the module for the costs)."""
    cached = view.__dict__.get(_VIEW_ATTR)
    if cached and (cached[1] is None or _files_unchanged(view.model) is not None):
        return cached[0]
    h = _header(view)
    files = _files_unchanged(view.model)
    if files is not None:
        for path in files:
            h.update(f"file:{path.name}|{path_digest(path, recursive=False)}\n".encode())
    else:
        for digest in _tensor_digests(view.model):
            h.update(digest.encode())
        h.update(_tokenizer_digest(view.tokenizer).encode())
    view.__dict__[_VIEW_ATTR] = (h.hexdigest()[:20], files)
    return view.__dict__[_VIEW_ATTR][0]


def map_cache_key(*parts: Any) -> str:
    """A short hash of everything a set of fitted maps depends on (plus FIT_VERSION)."""
    blob = json.dumps([FIT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---------------------------------------------------------------- data


def _names_data(key: str, value: str) -> bool:
    return key == "path" or key.endswith("_path") or "/" in value or value.endswith(DATA_SUFFIXES)


def data_fingerprint(config: dict) -> dict[str, str]:
    """'dotted.key=value' -> digest of every existing file or folder a config value names (keys
    `path`, `*_path`, or values with a '/' or a data suffix; the model groups excluded: weights
    identify those), and of the built-in data shipped with patchscan."""
    from patchscan.data.texts import BUILTIN_DIR

    found: dict[str, str] = {}

    def walk(node: Any, prefix: str, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not (prefix == "" and k in NOT_DATA):
                    walk(v, f"{prefix}.{k}" if prefix else str(k), str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}[{i}]", key)
        elif isinstance(node, str) and node and _names_data(key, node):
            path = Path(node).expanduser()
            if path.exists():
                found[f"{prefix}={node}"] = path_digest(path)

    walk(config, "", "")
    found["built-in data"] = path_digest(BUILTIN_DIR)
    return found


# ---------------------------------------------------------------- what a run used


class Inputs:
    """What a run used beyond its config, recorded while it is active (`start`..`stop`): the
    fingerprint of every model loaded and the key of every set of maps fitted or loaded."""

    _active: contextvars.ContextVar[Inputs | None] = contextvars.ContextVar("patchscan_inputs", default=None)

    def __init__(self) -> None:
        self.models: dict[str, str] = {}
        self.maps: dict[str, str] = {}
        self._token = None

    def start(self) -> Inputs:
        self._token = self._active.set(self)
        return self

    def stop(self) -> None:
        if self._token is not None:
            try:
                self._active.reset(self._token)
            except ValueError:  # stopped from another context: just leave it
                self._active.set(None)
            self._token = None

    @classmethod
    def current(cls) -> Inputs | None:
        return cls._active.get()

    @staticmethod
    def _add(record: dict[str, str], name: str, value: str) -> None:
        key, n = name, 1
        while record.get(key, value) != value:
            n += 1
            key = f"{name}#{n}"
        record[key] = value


def note_model(view) -> None:
    """Record a loaded model's fingerprint in the active run (computed only when one is active)."""
    inputs = Inputs.current()
    if inputs is not None:
        Inputs._add(inputs.models, view.name, model_fingerprint(view))


def note_maps(label: str, key: str) -> None:
    """Record the key of a set of maps a run uses."""
    inputs = Inputs.current()
    if inputs is not None:
        Inputs._add(inputs.maps, label, key)
