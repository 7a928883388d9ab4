"""Installed, not cloned (issue 12, point 4): a wheel of the project, installed into a folder of its
own, runs an experiment from an empty directory with nothing from the checkout: the configs ship
as package data, outputs land under the working directory, and `_run.json` has no git commit
(not even that of a git repository the working directory happens to be in)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _call(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel (from a copy, so the checkout gets no build/) and installed
    into a target folder, without dependencies (they come from this interpreter's environment)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    for name in ("src", "configs"):
        shutil.copytree(
            ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _call(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)], cwd=tmp)
    wheel = next((tmp / "dist").glob("patchscan-*.whl"))
    target = tmp / "project" / "lib" / "site"
    _call(pip + ["install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)], cwd=tmp)
    return target


def test_installed_package_runs_an_experiment_from_an_empty_directory(installed):
    work = installed.parents[1] / "work"  # inside an unrelated git repository: its commit must not be recorded
    work.mkdir()
    subprocess.run(["git", "init", "-q", str(installed.parents[1])], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PATCHSCAN_CONFIG_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(installed)
    probe = _call(
        [
            sys.executable,
            "-c",
            "import patchscan.cli.main as c, patchscan; print(patchscan.__file__); print(c.CONFIG_DIR)",
        ],
        cwd=work,
        env=env,
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in probe), probe
    assert (installed / "patchscan" / "configs" / "target_model" / "tiny_llama.yaml").is_file()  # a symlinked group
    _call(
        [
            str(installed / "bin" / "patchscan"),
            "run",
            "+experiment=next_token",
            "model=tiny_llama",
            "dataset.limit=5",
            "affine_lens.train_texts=40",
        ],
        cwd=work,
        env=env,
    )
    runs = list((work / "outputs" / "next_token").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file()
    assert len(pd.read_parquet(runs[0] / "results")) == 5 * 3 * 4
    meta = json.loads((runs[0] / "results" / "_run.json").read_text())
    assert meta["git_commit"] is None
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]


def test_every_subpackage_is_packaged():
    """Every folder that ships is declared, data-only ones too (config groups, data/builtin): an
    undeclared one is a setuptools BuildBackendWarning at every build, and a missing one is not shipped."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_namespace_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    configs = {f"patchscan.configs.{p}" for p in find_namespace_packages(str(ROOT / "configs"))}
    assert set(config["packages"]) == set(find_namespace_packages(str(ROOT / "src"))) | {"patchscan.configs"} | configs
    assert config["package-dir"]["patchscan.configs"] == "configs"


def test_checkout_records_its_commit():
    from patchscan.runs.identity import git_commit

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit() == head.strip()
