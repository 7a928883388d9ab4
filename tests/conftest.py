"""Shared fixtures: tiny random-weight models of several real HF architectures (built once).

Tests never write into the user's cache: fitted maps go to a temporary dir for the session
(PATCHSCAN_CACHE), the converted built-in model to the project's git-ignored .cache/models
(PATCHSCAN_MODEL_CACHE, converted once, shared by later sessions). Subprocesses inherit both.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="patchscan-test-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, True)
os.environ["PATCHSCAN_CACHE"] = _SESSION_CACHE
os.environ.setdefault("PATCHSCAN_MODEL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "models"))

from patchscan.models import load_model  # noqa: E402

ARCHS = ["tiny_gpt2", "tiny_llama", "tiny_neox", "tiny_qwen2", "tiny_gemma3"]  # the broad matrix
# One tiny model per family of the family table (models.families): the core equivalence tests run on all.
FAMILY_ARCHS = [*ARCHS, "tiny_mistral", "tiny_qwen3", "tiny_gptj", "tiny_opt"]
_CACHE: dict = {}


def tiny(name: str):
    """The tiny model configs/model/NAME.yaml describes, on the CPU, built once per session."""
    if name not in _CACHE:
        _CACHE[name] = load_model(name, device="cpu")
    return _CACHE[name]


@pytest.fixture(params=ARCHS)
def view(request):
    return tiny(request.param)


@pytest.fixture(params=FAMILY_ARCHS)
def family_view(request):
    """Every family of the table: for the core engine-vs-naive equivalence tests only (test time)."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def builtin_view():
    return load_model({"source": "builtin", "name": "smollm2_135m", "device": "cpu"})


# A fresh clone converts Gemma 3 270M once (about 70 s, mostly its 262k-token tokenizer read from the
# GGUF): when the session will need it, a background process converts it while the other tests run.
_CONVERTING: dict[str, subprocess.Popen] = {}


def pytest_collection_modifyitems(config, items):
    from patchscan.models.loading import builtin_cache_folder

    wanted = any("gemma_view" in getattr(item, "fixturenames", ()) for item in items)
    if wanted and not (builtin_cache_folder("gemma3_270m") / "config.json").exists():
        code = "from patchscan.models.loading import builtin_folder; builtin_folder('gemma3_270m')"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        _CONVERTING["gemma3_270m"] = subprocess.Popen([sys.executable, "-c", code], env=env)


def pytest_unconfigure(config):
    for proc in _CONVERTING.values():  # a session cut short leaves no converter behind (SIGINT: it cleans up)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def gemma_view():
    if "gemma3_270m" in _CONVERTING:
        _CONVERTING.pop("gemma3_270m").wait()  # failed or not: load_model converts if no copy exists
    return load_model({"source": "builtin", "builtin": "gemma3_270m", "name": "gemma3_270m", "device": "cpu"})


def registered_by_us(hook) -> bool:
    """A hook patchscan or a test registered (transformers keeps its output-capturing hooks for good)."""
    module = getattr(hook, "__module__", "") or ""
    return module.startswith(("patchscan", "tests"))


@pytest.fixture(autouse=True)
def _no_hooks_left_behind():
    """Every test leaves the shared tiny models as it found them: none of our hooks, no stand-in blocks."""
    yield
    for name, view in _CACHE.items():
        left = [
            f"block {b}: {hook.__qualname__}"
            for b, block in enumerate(view.blocks)
            for hooks in (block._forward_hooks, block._forward_pre_hooks)
            for hook in hooks.values()
            if registered_by_us(hook)
        ]
        left += [
            f"block {b} is a {type(block).__name__}"
            for b, block in enumerate(view.blocks)
            if registered_by_us(type(block))
        ]
        assert not left, f"{name} left with {left}"
