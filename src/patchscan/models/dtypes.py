"""Is half precision fast here? bf16 matmuls run several times faster than fp32 on CPUs with native
bf16 (AVX-512 BF16, AMX, Arm BF16) and many times slower on CPUs without it; GPUs have it.

fp32 stays the CPU default; `model.dtype=bfloat16` is honoured everywhere, with one line saying
so when this CPU lacks native bf16 (`scripts/bench.py --dtype bfloat16` measures both).
`model.dtype=auto` is bf16 on a GPU, fp32 on a CPU (`default_dtype`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX; Arm's "bf16" feature


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bf16 natively (else torch emulates it, slowly)."""
    return bool(_BF16_FLAGS & cpu_flags())


def native_bf16_line() -> str:
    """One line for reports: does this CPU have native bf16?"""
    if cpu_has_native_bf16():
        return f"this CPU has native bf16 ({', '.join(sorted(_BF16_FLAGS & cpu_flags()))})"
    return "this CPU has no native bf16: bf16 matmuls are emulated and usually slower than fp32"


def default_dtype(device: torch.device | None) -> torch.dtype:
    """What `dtype: auto` means on a device: bf16 on a GPU (its fast path), fp32 elsewhere (today's CPU
    default; bf16 on a CPU stays opt-in, since without native bf16 it is slower)."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def note_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Say in one line when bf16 is asked for on a CPU that lacks native support."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning("model.dtype=bfloat16 on CPU: %s (float32 is the CPU default)", native_bf16_line())
