"""Capture, patch and read out hidden states: the batched engine and its naive reference; and
`embed_texts`, the sentence-embedding model experiments score descriptions with (model work too:
a dry run's `CountingEngine` stands in for all of it)."""

from patchscan.engine.alignment import fit_cross_model_maps, fit_lens_maps
from patchscan.engine.capture import capture
from patchscan.engine.mappings import Affine, Identity, Scale, load_mapping
from patchscan.engine.patching import Patch, generate, patched_logits, patched_next_token
from patchscan.metrics.similarity import embed as embed_texts

__all__ = [
    "capture",
    "Patch",
    "patched_logits",
    "patched_next_token",
    "generate",
    "embed_texts",
    "fit_lens_maps",
    "fit_cross_model_maps",
    "Identity",
    "Scale",
    "Affine",
    "load_mapping",
]
