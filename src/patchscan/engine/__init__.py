"""Capture, patch and read out hidden states: the batched engine and its naive reference."""

from patchscan.engine.capture import capture
from patchscan.engine.mappings import Affine, Identity, Scale, load_mapping
from patchscan.engine.patching import Patch, generate, patched_logits, patched_next_token

__all__ = [
    "capture",
    "Patch",
    "patched_logits",
    "patched_next_token",
    "generate",
    "Identity",
    "Scale",
    "Affine",
    "load_mapping",
]
