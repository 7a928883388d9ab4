"""Fitting affine maps between two models' blocks on token positions that both tokenizers share.

A position pair (i, j) is usable when the text up to token i of the source tokenization and up to
token j of the target tokenization end at the same character, so both states have read the same
prefix. With one shared tokenizer every position pairs with itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from patchscan.engine.capture import capture
from patchscan.engine.mappings import Affine, cached_maps, map_folder
from patchscan.models.fingerprints import map_cache_key, model_fingerprint
from patchscan.models.view import ModelView

log = logging.getLogger(__name__)


def aligned_positions(source: ModelView, target: ModelView, text: str, max_tokens: int = 64):
    """(source ids, target ids, [(i, j), ...]) for positions whose decoded prefixes agree."""
    enc_s = source.tokenizer(text, return_offsets_mapping=True)
    enc_t = target.tokenizer(text, return_offsets_mapping=True)
    ends_t = {end: j for j, (_, end) in enumerate(enc_t["offset_mapping"][:max_tokens]) if end > 0}
    pairs = [(i, ends_t[end]) for i, (_, end) in enumerate(enc_s["offset_mapping"][:max_tokens]) if end in ends_t]
    return list(enc_s["input_ids"][:max_tokens]), list(enc_t["input_ids"][:max_tokens]), pairs


def fit_cross_model_maps(
    source: ModelView,
    target: ModelView,
    texts: list[str],
    pairs: list[tuple[int, int]],
    cache_dir: Path,
    ridge: float = 0.01,
    max_positions: int = 10000,
    batch_size: int = 32,
) -> dict[tuple[int, int], Affine]:
    """One least-squares affine map per (source block, target block), cached on disk."""
    aligned = [aligned_positions(source, target, t) for t in texts]
    aligned = [a for a in aligned if a[2]]
    key = map_cache_key(
        "cross_model",
        model_fingerprint(source),
        model_fingerprint(target),
        str(source.dtype),
        str(target.dtype),
        [a[0] for a in aligned],
        [a[1] for a in aligned],
        [a[2] for a in aligned],
        ridge,
        max_positions,
    )
    folder = map_folder(cache_dir, "cross-model", [source.name, target.name], key)

    def fit() -> dict[tuple[int, int], Affine]:
        s_layers = sorted({s for s, _ in pairs})
        t_layers = sorted({t for _, t in pairs})
        log.info("fitting %d cross-model maps on %d texts", len(pairs), len(aligned))
        caps_s = capture(source, [a[0] for a in aligned], s_layers, [[i for i, _ in a[2]] for a in aligned], batch_size)
        caps_t = capture(target, [a[1] for a in aligned], t_layers, [[j for _, j in a[2]] for a in aligned], batch_size)
        xs = torch.cat([c.states for c in caps_s], dim=1)[:, :max_positions].float()
        ys = torch.cat([c.states for c in caps_t], dim=1)[:, :max_positions].float()
        return {(s, t): Affine.fit(xs[s_layers.index(s)], ys[t_layers.index(t)], ridge=ridge) for s, t in pairs}

    files = {p: f"s{p[0]}-t{p[1]}.pt" for p in pairs}
    return cached_maps(folder, files, (source.width, target.width), fit)
