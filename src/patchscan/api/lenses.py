"""Lenses: read a block's state as next-token logits, directly or through fitted affine maps.

`LogitLens` reads a state through the model's final norm and unembedding. `AffineMaps` is a set of
least-squares affine maps keyed by (source block, target block), fitted on paired states, saved
and loaded as one file per pair, and cached by content in one layout (`engine.mappings.cached_maps`,
keyed by `patchscan.models.fingerprints`: the weights' exact fingerprint, dtype, the token ids fitted on, the
settings and FIT_VERSION). `AffineLens` maps each
block to the last block of the same model (both before the final norm, so the norm is applied
once) and then reads out; cross-model patching uses `AffineMaps.fit_between` two models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from patchscan.api.states import State
from patchscan.engine.alignment import fit_cross_model_maps, fit_lens_maps
from patchscan.engine.mappings import Affine, load_mapping
from patchscan.errors import UserError
from patchscan.models.view import ModelView
from patchscan.paths import cache_root

log = logging.getLogger(__name__)


def _tensor(lm: ModelView, state: State | torch.Tensor) -> torch.Tensor:
    """A state (or a (..., width) tensor of states) of `lm`, checked (`ModelView.check_state`)."""
    return lm.check_state(state, "state read by the lens", dims=(1, 2, 3))


class LogitLens:
    """Block outputs read through the final norm and unembedding (nostalgebraist's logit lens).

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> src = ps.capture(lm, "The Eiffel Tower", layers=[1], positions=[-1])
    >>> lens = ps.LogitLens(lm)
    >>> lens(src.at(layer=1)).shape == (lm.vocab_size,)
    True
    >>> isinstance(lens.top_tokens(src.at(layer=1), k=3)[0], str)
    True
    """

    def __init__(self, lm: ModelView):
        self.lm = lm

    def map(self, state: State | torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The state as the last block would hold it: unchanged for the logit lens."""
        return _tensor(self.lm, state)

    def __call__(self, state: State | torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Next-token logits (float32) of a state or of a (..., width) tensor of states."""
        return self.lm.readout(self.map(state, layer))

    def top_tokens(self, state: State | torch.Tensor, k: int = 5, layer: int | None = None) -> list[str]:
        """The k most likely next tokens of one state, as text."""
        ids = self(state, layer).topk(k, dim=-1).indices.reshape(-1).tolist()
        return [self.lm.tokenizer.decode([t]) for t in ids]


class AffineMaps:
    """Affine maps fitted per (source block, target block) on paired states; `maps[s, t](h)` applies one.

    >>> import patchscan as ps, torch
    >>> x, y = torch.randn(200, 8), torch.randn(200, 8)
    >>> maps = ps.AffineMaps({(0, 3): ps.engine.Affine.fit(x, 2 * x + 1)})
    >>> torch.allclose(maps[0, 3](x[:2]), 2 * x[:2] + 1, atol=1e-4)
    True
    >>> maps.pairs
    [(0, 3)]
    """

    def __init__(self, maps: dict[tuple[int, int], Affine]):
        self.maps = dict(maps)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted(self.maps)

    def __getitem__(self, pair: tuple[int, int]) -> Affine:
        if pair not in self.maps:
            raise UserError(f"no affine map fitted for blocks {pair}; fitted: {self.pairs}")
        return self.maps[pair]

    def apply(self, state: State | torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor:
        return self[source_layer, target_layer](state.vector if isinstance(state, State) else state)

    def save(self, folder: str | Path) -> None:
        """One file per pair (s{ℓ}-t{ℓ*}.pt), each written atomically."""
        for (s, t), affine in self.maps.items():
            affine.save(Path(folder) / f"s{s}-t{t}.pt")

    @classmethod
    def load(cls, folder: str | Path, pairs: Sequence[tuple[int, int]] | None = None) -> AffineMaps:
        """The maps saved in `folder` (all of them, or `pairs`)."""
        folder = Path(folder)
        if pairs is None:
            pairs = [tuple(int(x[1:]) for x in p.stem.split("-")) for p in folder.glob("s*-t*.pt")]
        missing = [p for p in pairs if not (folder / f"s{p[0]}-t{p[1]}.pt").is_file()]
        if missing or not pairs:
            raise UserError(f"no affine map for blocks {missing[0] if missing else 'any'} in {folder}")
        return cls({tuple(p): load_mapping(folder / f"s{p[0]}-t{p[1]}.pt") for p in pairs})

    @classmethod
    def fit_between(
        cls,
        source: ModelView,
        target: ModelView,
        texts: Sequence[str],
        pairs: Sequence[tuple[int, int]],
        ridge: float = 0.01,
        max_positions: int = 10000,
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ) -> AffineMaps:
        """Maps from `source`'s block ℓ to `target`'s block ℓ* on the token positions both
        tokenizations share, one per pair; cached (default under the cache root's maps/).

        >>> import patchscan as ps
        >>> a, b = ps.load_model("tiny_llama", device="cpu"), ps.load_model("tiny_gpt2", device="cpu")
        >>> texts = ["The Eiffel Tower is in Paris, the capital of France."] * 4
        >>> maps = ps.AffineMaps.fit_between(a, b, texts, [(1, 2)], max_positions=40)
        >>> tuple(maps.apply(torch.zeros(a.width), 1, 2).shape) == (b.width,)
        True
        """
        folder = Path(cache_dir) if cache_dir else cache_root() / "maps"
        fitted = fit_cross_model_maps(
            source,
            target,
            list(texts),
            list(pairs),
            folder,
            ridge=ridge,
            max_positions=max_positions,
            batch_size=batch_size,
        )
        return cls(fitted)


class AffineLens(LogitLens):
    """The affine ("tuned") lens: block ℓ's state mapped to the last block's by a fitted affine map,
    then read out like the logit lens.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> texts = ["The Eiffel Tower is in Paris, the capital of France."] * 4
    >>> lens = ps.AffineLens.fit(lm, texts, layers=[1], max_positions=40, ridge=0.01)
    >>> src = ps.capture(lm, "The Eiffel Tower", layers=[1], positions=[-1])
    >>> lens(src.at(layer=1)).shape == (lm.vocab_size,)
    True

    `fit` reuses a cached fit when everything it depends on is the same; `save(folder)` and
    `AffineLens.load(lm, folder)` keep one file per block.
    """

    def __init__(self, lm: ModelView, maps: dict[int, Affine]):
        super().__init__(lm)
        self.maps = dict(maps)

    @property
    def layers(self) -> list[int]:
        return sorted(self.maps)

    def map(self, state: State | torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The state mapped to the last block's output (`layer` defaults to the State's own)."""
        layer = state.layer if layer is None and isinstance(state, State) else layer
        if layer is None:
            raise UserError("AffineLens needs the block of a bare tensor: pass layer=")
        layer = self.lm.check_layer(layer)
        if layer not in self.maps:
            raise UserError(f"the affine lens has no map for block {layer}; fitted blocks: {self.layers}")
        return self.maps[layer](_tensor(self.lm, state))

    def save(self, folder: str | Path) -> None:
        for layer, affine in self.maps.items():
            affine.save(Path(folder) / f"block{layer}.pt")

    @classmethod
    def load(cls, lm: ModelView, folder: str | Path, layers: Sequence[int] | None = None) -> AffineLens:
        folder = Path(folder)
        if layers is None:
            layers = sorted(int(p.stem[len("block") :]) for p in folder.glob("block*.pt"))
        missing = [b for b in layers if not (folder / f"block{b}.pt").is_file()]
        if missing or not layers:
            raise UserError(f"no affine-lens map for block {missing[0] if missing else 'any'} in {folder}")
        return cls(lm, {b: load_mapping(folder / f"block{b}.pt") for b in layers})

    @classmethod
    def fit(
        cls,
        lm: ModelView,
        texts: Sequence[str],
        layers: Sequence[int] | None = None,
        positions_per_text: int = 64,
        max_positions: int = 10000,
        ridge: float = 0.01,
        batch_size: int = 64,
        cache: bool = True,
    ) -> AffineLens:
        """Fit block ℓ -> last block maps by least squares on every position of `texts` (the first
        `positions_per_text` tokens of each, at most `max_positions` in all)."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise UserError(f"AffineLens.fit needs a non-empty list of texts to fit on, not {texts!r:.80}")
        layers = sorted({lm.check_layer(b) for b in (range(lm.n_blocks) if layers is None else layers)})
        maps = fit_lens_maps(lm, list(texts), layers, positions_per_text, max_positions, ridge, batch_size, cache)
        return cls(lm, maps)
