"""Shared fixtures: tiny random-weight models of several real HF architectures (built once)."""

from __future__ import annotations

import pytest

from patchscan.models import load_model

ARCHS = ["tiny_gpt2", "tiny_llama", "tiny_neox", "tiny_qwen2", "tiny_gemma3"]
_ARCH_OF = {"tiny_gpt2": "gpt2", "tiny_llama": "llama", "tiny_neox": "gpt_neox", "tiny_qwen2": "qwen2",
            "tiny_gemma3": "gemma3_text"}
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
