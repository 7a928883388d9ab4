"""Shared fixtures: tiny random-weight models of several real HF architectures (built once).

Tests never write into the user's cache: fitted maps go to a temporary dir for the session
(PATCHSCAN_CACHE), the converted built-in model to the project's git-ignored .cache/models
(PATCHSCAN_MODEL_CACHE, converted once, shared by later sessions). Subprocesses inherit both.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="patchscan-test-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, True)
os.environ["PATCHSCAN_CACHE"] = _SESSION_CACHE
os.environ.setdefault("PATCHSCAN_MODEL_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "models"))

from patchscan.models import load_model  # noqa: E402

ARCHS = ["tiny_gpt2", "tiny_llama", "tiny_neox", "tiny_qwen2", "tiny_gemma3"]
_ARCH_OF = {
    "tiny_gpt2": "gpt2",
    "tiny_llama": "llama",
    "tiny_neox": "gpt_neox",
    "tiny_qwen2": "qwen2",
    "tiny_gemma3": "gemma3_text",
}
_CACHE: dict = {}


def tiny(name: str):
    if name not in _CACHE:
        _CACHE[name] = load_model({"source": "tiny", "arch": _ARCH_OF[name], "name": name, "device": "cpu"})
    return _CACHE[name]


@pytest.fixture(params=ARCHS)
def view(request):
    return tiny(request.param)


@pytest.fixture(scope="session")
def builtin_view():
    return load_model({"source": "builtin", "name": "smollm2_135m", "device": "cpu"})


@pytest.fixture(scope="session")
def gemma_view():
    return load_model({"source": "builtin", "builtin": "gemma3_270m", "name": "gemma3_270m", "device": "cpu"})
