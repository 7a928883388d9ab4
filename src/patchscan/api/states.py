"""Source states from text: `capture` runs a prompt once and keeps block outputs at chosen positions.

The engine's `capture` takes token ids and nested position lists; this is its face for people:
strings in, negative positions allowed, and states indexed by (layer, position) that remember
where they came from, so patches made from them can say so in result frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchscan import grids
from patchscan.engine.capture import capture as capture_ids
from patchscan.errors import UserError
from patchscan.models.families import DEFAULT_SITE
from patchscan.models.view import ModelView


@dataclass(frozen=True)
class State:
    """One hidden state: the output of block `layer` (or another `site` of it) at token `position` of `text`.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> state = ps.capture(lm, "Hello world", layers=[1], positions=[-1]).at(layer=1)
    >>> state.layer, state.position, tuple(state.vector.shape)
    (1, 1, (64,))

    `position` is resolved (0-based, counted from the start); `site` is where in the block it was
    read (models.families.SITES; "resid_post", the block's output, by default); `model` names the
    model it came from (`ModelView.name`), so patching it into another model is refused unless asked
    for. `map(fn)` gives the same state with its vector mapped, e.g. by an affine map before a
    cross-model patch (`map(fn, model=target_lm)`: the mapped state then belongs to the target model).
    """

    vector: torch.Tensor
    layer: int
    position: int
    text: str | None = None
    token_ids: tuple[int, ...] = ()
    model: str | None = None
    site: str = DEFAULT_SITE

    def map(self, fn, model=None) -> State:
        """This state with `fn(vector)` as its vector; the provenance stays, and `model` (a
        ModelView or its name) is the model whose space `fn` maps into (default: this state's)."""
        owner = self.model if model is None else getattr(model, "name", model)
        return State(fn(self.vector), self.layer, self.position, self.text, self.token_ids, owner, self.site)


@dataclass
class States:
    """Block outputs of one prompt at the captured layers and positions.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> import torch
    >>> src = ps.capture(lm, "The Eiffel Tower is in", layers=[0, 3], positions=[0, -1])
    >>> src.layers, src.positions, tuple(src.tensor.shape)
    ([0, 3], [0, 5], (2, 2, 64))
    >>> torch.equal(src[3, -1], src.at(layer=3, position=5).vector)
    True

    `at(layer, position)` returns a `State`; `states[layer, position]` the bare tensor. Positions
    may be given as captured (negative ones too) or resolved. With `logprobs=True` at capture,
    `next_token_logprobs(position)` is the model's own next-token distribution there (p_L).
    """

    text: str | None
    token_ids: list[int]
    layers: list[int]
    positions: list[int]
    tensor: torch.Tensor  # (n_layers, n_positions, width)
    logprobs: torch.Tensor | None = None  # (n_positions, vocab)
    n_blocks: int = 0  # of the model, for negative layers
    model: str | None = None  # the model's name (ModelView.name): where these states came from
    site: str = DEFAULT_SITE  # where in each block the states were read

    def _position_index(self, position: int | None) -> int:
        if position is None:
            if len(self.positions) != 1:
                raise UserError(f"several positions were captured ({self.positions}); name one with position=")
            return 0
        resolved = grids.position(position, len(self.token_ids), "position", repr(self.text) if self.text else None)
        if resolved not in self.positions:
            raise UserError(f"position {position} was not captured; captured positions: {self.positions}")
        return self.positions.index(resolved)

    def _layer_index(self, layer: int | str) -> int:
        if not self.n_blocks:  # made by hand without the model's depth: plain indices only
            raise UserError("these States do not know the model's number of blocks (n_blocks=0); set n_blocks=")
        resolved = grids.block(layer, self.n_blocks, "layer")
        if resolved not in self.layers:
            raise UserError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.layers.index(resolved)

    def at(self, layer: int | str, position: int | str | None = None) -> State:
        """The state of block `layer` at `position` (may be omitted when one position was captured);
        either may be negative or a one-block spec such as `last`."""
        j, k = self._position_index(position), self._layer_index(layer)
        return State(
            self.tensor[k, j],
            self.layers[k],
            self.positions[j],
            self.text,
            tuple(self.token_ids),
            self.model,
            self.site,
        )

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        layer, position = key
        return self.tensor[self._layer_index(layer), self._position_index(position)]

    def next_token_logprobs(self, position: int | None = None) -> torch.Tensor:
        """The model's own next-token log-probabilities at a captured position (needs logprobs=True)."""
        if self.logprobs is None:
            raise UserError("next-token log-probabilities were not captured; call capture(..., logprobs=True)")
        return self.logprobs[self._position_index(position)]

    def tokens(self, lm: ModelView) -> list[str]:
        """The prompt's tokens as strings, one per position."""
        return [lm.tokenizer.decode([t]) for t in self.token_ids]


def capture(
    lm: ModelView,
    text_or_texts: str | Sequence[str],
    layers: Sequence[int] | str | None = None,
    positions: Sequence[int] | str | None = None,
    logprobs: bool = False,
    batch_size: int = 32,
    site: str = DEFAULT_SITE,
) -> States | list[States]:
    """Run text(s) once and keep the outputs of blocks `layers` at token `positions`.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> src = ps.capture(lm, "The Eiffel Tower is located in the city of", layers=[1, 2], positions=[-1])
    >>> tuple(src.at(layer=2).vector.shape)
    (64,)
    >>> [s.positions for s in ps.capture(lm, ["a b", "a b c d"], positions=[-1])]
    [[1], [3]]

    A string gives one `States`, a list of strings a list of them (run in batches; padding never
    shifts positions). `layers` default to every block, `positions` to every token; both take the
    block grammar of `patchscan.grids` (`last`, `"0:4:2"`, `[0, -1]`; negative values count from the
    end, of the tokenized text for positions, BOS included where the tokenizer adds one).

    `site` chooses what of each block is kept, the same names on every family: "resid_post" (the
    block's output, the default), "resid_mid" (the residual after attention, before the MLP),
    "attn_out" (the attention module's output), "mlp_in" (the MLP's input, after its norm) and
    "mlp_out" (the MLP module's output); a site the model's family lacks is refused.

    >>> mlp = ps.capture(lm, "Paris", layers=[1], positions=[-1], site="mlp_out")
    >>> mlp.site, mlp.at(layer=1).site
    ('mlp_out', 'mlp_out')
    """
    single = isinstance(text_or_texts, str)
    if not single and not (isinstance(text_or_texts, Sequence) and all(isinstance(t, str) for t in text_or_texts)):
        raise UserError(f"capture takes a text or a list of texts, not {text_or_texts!r:.80}")
    texts = [text_or_texts] if single else list(text_or_texts)
    if not texts:
        raise UserError("capture needs at least one text")
    layers = grids.blocks("all" if layers is None else layers, lm.n_blocks, "layers", lm.name)
    lm.site(site)  # an unknown site, or one the family lacks, is refused before any work
    ids = [lm.encode(t) for t in texts]
    empty = [t for t, x in zip(texts, ids) if not x]
    if empty:
        raise UserError(f"the text {empty[0]!r} has no tokens")
    spec = "all" if positions is None else positions
    # a position named twice is named twice in the longest text; in a shorter one, 0 and -1 may meet
    longest = max(range(len(ids)), key=lambda k: len(ids[k]))
    grids.positions(spec, len(ids[longest]), "positions", repr(texts[longest]))
    wanted = [grids.positions(spec, len(x), "positions", repr(t), distinct=False) for t, x in zip(texts, ids)]
    caps = capture_ids(lm, ids, layers, wanted, batch_size=batch_size, with_logprobs=logprobs, site=site)
    out = [
        States(text, x, list(c.layers), list(c.positions), c.states, c.logprobs, lm.n_blocks, lm.name, site)
        for text, x, c in zip(texts, ids, caps)
    ]
    return out[0] if single else out
