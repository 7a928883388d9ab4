"""Where patchscan's files are: the config folder, the cache folders, and a config option composed
from its files.

The library and the command line both read these from here; nothing in the library imports the
CLI. Light on purpose (no torch, no transformers): the CLI imports it before any model work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from patchscan.errors import UserError


def config_dir() -> Path:
    """The Hydra configs: $PATCHSCAN_CONFIG_DIR, else those shipped in the installed package
    (patchscan/configs), else the checkout's top-level configs/ (a source tree on PYTHONPATH)."""
    from importlib.resources import files

    if os.environ.get("PATCHSCAN_CONFIG_DIR"):
        return Path(os.environ["PATCHSCAN_CONFIG_DIR"])
    packaged = Path(str(files("patchscan") / "configs"))
    if (packaged / "config.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def _cache_folder(variable: str, default: Path) -> Path:
    """The folder an environment variable names (else `default`); one error line when it is a file."""
    env = os.environ.get(variable)
    path = Path(env).expanduser() if env else default
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{variable if env else 'the cache folder'}={path} is a file, not a folder; point it at a folder"
        )
    return path


def cache_root() -> Path:
    """Where converted models and fitted maps are kept between runs."""
    return _cache_folder(
        "PATCHSCAN_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patchscan"
    )


def model_cache_root() -> Path:
    """Where converted models are kept: PATCHSCAN_MODEL_CACHE, else <cache root>/models (tests share one)."""
    if os.environ.get("PATCHSCAN_MODEL_CACHE"):
        return _cache_folder("PATCHSCAN_MODEL_CACHE", Path())
    return cache_root() / "models"


def option_names(group: str) -> list[str]:
    """The options of a config group (configs/GROUP/*.yaml), less the bases (_hub, _tiny)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_option(group: str, name: str) -> dict[str, Any] | None:
    """Option NAME of a config group as Hydra gives it to a run (`GROUP=NAME`): its file merged over
    the files its `defaults:` list names in the same folder (e.g. `defaults: [_tiny, _self_]`);
    None when there is no such file."""
    from omegaconf import OmegaConf

    yaml = config_dir() / group / f"{name}.yaml"
    return OmegaConf.to_container(_composed(yaml), resolve=True) if "/" not in name and yaml.is_file() else None


def _composed(yaml: Path):
    from omegaconf import OmegaConf

    conf = OmegaConf.load(yaml)
    merged = OmegaConf.create()
    for base in conf.pop("defaults", None) or []:
        if isinstance(base, str) and base != "_self_":
            merged = OmegaConf.merge(merged, _composed(yaml.parent / f"{base}.yaml"))
    return OmegaConf.merge(merged, conf)


def model_config(name_or_path: str) -> dict[str, Any]:
    """The model config a string names: a config name, a GGUF file, a model folder or a hub id (ORG/NAME)."""
    composed = compose_option("model", name_or_path)
    if composed is not None:
        return composed
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return {"source": "gguf", "path": str(path), "name": path.stem}
    if path.is_dir():
        return {"source": "folder", "path": str(path), "name": path.resolve().name}
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return {"source": "hub", "id": name_or_path, "name": name_or_path.split("/")[-1]}
    raise UserError(
        f"unknown model {name_or_path!r}: not a model config ({', '.join(option_names('model'))}), "
        "an existing folder or GGUF file, or a hub id ORG/NAME"
    )
