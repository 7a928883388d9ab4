"""A run's identity: the config fingerprint (all that decides results, not how they are batched or
sharded), the run identity (config, exact model fingerprints, data digests, fitted maps) and its
short id that every part carries, the key of each example, and the run's metadata (_run.json)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from patchscan.models.fingerprints import Inputs

# example fields that are results of the model, not its definition (left out of example_key)
DERIVED_FIELDS = ("probe", "filled_generation", "filled_correct")


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
