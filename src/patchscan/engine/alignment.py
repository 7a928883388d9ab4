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
from patchscan.engine.mappings import Affine, map_folder
from patchscan.engine.patching import MODEL, Backend
from patchscan.errors import UserError
from patchscan.models.fingerprints import map_cache_key, model_fingerprint
from patchscan.models.view import ModelView
from patchscan.paths import cache_root

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
    backend: Backend | None = None,
) -> dict[tuple[int, int], Affine]:
    """One least-squares affine map per (source block, target block), cached on disk. The captures,
    the solves and the cache go through `backend` (`engine.patching.Backend`; a dry run's counts them)."""
    backend = backend or MODEL
    aligned = [aligned_positions(source, target, t) for t in texts]
    aligned = [a for a in aligned if a[2]]

    def folder() -> Path:
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
        return map_folder(cache_dir, "cross-model", [source.name, target.name], key)

    def fit() -> dict[tuple[int, int], Affine]:
        s_layers = sorted({s for s, _ in pairs})
        t_layers = sorted({t for _, t in pairs})
        log.info("fitting %d cross-model maps on %d texts", len(pairs), len(aligned))
        s_pos, t_pos = [[i for i, _ in a[2]] for a in aligned], [[j for _, j in a[2]] for a in aligned]
        caps_s = capture(source, [a[0] for a in aligned], s_layers, s_pos, batch_size, backend=backend)
        caps_t = capture(target, [a[1] for a in aligned], t_layers, t_pos, batch_size, backend=backend)
        xs = torch.cat([c.states for c in caps_s], dim=1)[:, :max_positions].float()
        ys = torch.cat([c.states for c in caps_t], dim=1)[:, :max_positions].float()
        return {(s, t): backend.fit_affine(xs[s_layers.index(s)], ys[t_layers.index(t)], ridge) for s, t in pairs}

    files = {p: f"s{p[0]}-t{p[1]}.pt" for p in pairs}
    return backend.cached_maps(folder, files, (source.width, target.width), fit)


def fit_lens_maps(
    view: ModelView,
    texts: list[str],
    layers: list[int],
    positions_per_text: int = 64,
    max_positions: int = 10000,
    ridge: float = 0.01,
    batch_size: int = 64,
    cache: bool = True,
    backend: Backend | None = None,
) -> dict[int, Affine]:
    """The affine lens's maps, block ℓ -> last block, by least squares on every position of `texts`
    (the first `positions_per_text` tokens of each, at most `max_positions` in all); cached by
    content. The captures, the solves and the cache go through `backend`, as for cross-model maps."""
    backend = backend or MODEL
    ids = [view.encode(t)[:positions_per_text] for t in texts]

    def fit() -> dict[int, Affine]:
        log.info("fitting affine-lens maps on %d texts", len(ids))
        last = view.n_blocks - 1
        positions = [list(range(len(x))) for x in ids]
        caps = capture(view, ids, layers + [last], positions, batch_size=batch_size, backend=backend)
        states = torch.cat([c.states for c in caps], dim=1)[:, :max_positions]
        if states.shape[1] <= view.width // 4:
            raise UserError(f"affine lens: only {states.shape[1]} training positions for width {view.width}; add texts")
        return {b: backend.fit_affine(states[k], states[-1], float(ridge)) for k, b in enumerate(layers)}

    if not cache:
        return fit()

    def folder() -> Path:
        key = map_cache_key("affine_lens", model_fingerprint(view), str(view.dtype), ids, max_positions, float(ridge))
        return map_folder(cache_root() / "maps", "affine-lens", [view.name], key)

    return backend.cached_maps(folder, {b: f"block{b}.pt" for b in layers}, (view.width, view.width), fit)
