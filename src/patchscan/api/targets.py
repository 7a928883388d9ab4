"""Target prompts with a placeholder, and the patches they make.

A `TargetPrompt` is tokenized once; its placeholder's last token is the target position i*.
`patch(state, layer=ℓ*)` makes one `Patch` (keyword-only: which block, which position, which
vector); `baseline()` the same prompt run unpatched, explicitly, so a grid can hold both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from patchscan import grids
from patchscan.api.states import State, States
from patchscan.engine.patching import Patch as EnginePatch
from patchscan.errors import UserError
from patchscan.experiments.prompts import placeholder_position
from patchscan.models.families import DEFAULT_SITE
from patchscan.models.view import ModelView


@dataclass(kw_only=True)
class Patch(EnginePatch):
    """One patched run: `vector` overwrites block `target_layer`'s output (or its `target_site`) at
    `target_position` of `target_ids`; `vector=None` is the unpatched baseline (see `Patch.baseline`).

    >>> import patchscan as ps
    >>> p = ps.Patch(target_ids=(1, 2, 3), target_position=-1, target_layer=2, vector=None)
    >>> p.is_baseline
    True

    Every field is keyword-only, so a block is never mistaken for a position. `source` (the `State`
    the vector came from) and `target_prompt` (the text) only label result frames.
    """

    source: State | None = None
    target_prompt: str | None = None

    @classmethod
    def baseline(cls, *, target_ids: Sequence[int], target_position: int = -1, target_prompt: str | None = None):
        """The target prompt run unpatched: what the model says with nothing overwritten.

        >>> import patchscan as ps
        >>> ps.Patch.baseline(target_ids=(1, 2, 3)).vector is None
        True
        """
        return cls(
            target_ids=tuple(target_ids),
            target_position=target_position,
            target_layer=0,
            vector=None,
            target_prompt=target_prompt,
        )

    @property
    def is_baseline(self) -> bool:
        return self.vector is None


def _vector(lm: ModelView, state: State | torch.Tensor, allow_other_model: bool) -> tuple[torch.Tensor, State | None]:
    """The vector to patch into `lm` (one state of its width) and the State it came from, if any.

    A State captured from another model is refused unless `allow_other_model` (patching across
    models without a map is an ablation, so it is asked for by name); a mapped state
    (`State.map(fn, model=target)`) belongs to the model it was mapped into."""
    source = state if isinstance(state, State) else None
    if source is not None and source.model is not None and source.model != lm.name and not allow_other_model:
        raise UserError(
            f"this state was captured from {source.model!r}, not from {lm.name!r} (the target model): map it "
            "(AffineMaps.fit_between, State.map(fn, model=...)) or pass allow_other_model=True"
        )
    return lm.check_state(state, "patched vector"), source


class TargetPrompt:
    """A target prompt T whose placeholder marks the target position i*.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> target = ps.TargetPrompt(lm, "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?", placeholder="?")
    >>> target.position == len(target.token_ids) - 1
    True
    >>> src = ps.capture(lm, "The Eiffel Tower", layers=[2], positions=[-1])
    >>> patch = target.patch(src.at(layer=2), layer=3)
    >>> patch.target_layer, patch.source.layer, target.patch(src.at(layer=2)).target_layer
    (3, 2, 2)

    The placeholder is the text `x` of the paper's prompts or `?` of the identity prompt, found as a
    word of its own (not the x of "fox") and one token; where it occurs several times, `occurrence`
    picks one (0 the first, -1 the last), else the prompt is refused.
    `TargetPrompt.named(lm, "entity_description")` reads the prompts of configs/patchscope/
    (token_identity, entity_description).
    """

    def __init__(self, lm: ModelView, text: str, placeholder: str = "x", occurrence: int | None = None):
        if not isinstance(text, str) or not isinstance(placeholder, str):
            kinds = f"{type(text).__name__} and {type(placeholder).__name__}"
            raise UserError(f"a target prompt and its placeholder are text, not {kinds}")
        self.lm, self.text, self.placeholder, self.occurrence = lm, text, placeholder, occurrence
        ids, self.position = placeholder_position(lm, text, placeholder, occurrence)
        self.token_ids = tuple(ids)

    @property
    def placeholder_token(self) -> str:
        """The token patched, as text (what the model reads at the target position)."""
        return self.lm.tokenizer.decode([self.token_ids[self.position]])

    @classmethod
    def named(cls, lm: ModelView, name: str) -> TargetPrompt:
        """The target prompt of a patchscope config (configs/patchscope/NAME.yaml).

        >>> import patchscan as ps
        >>> lm = ps.load_model("tiny_llama", device="cpu")
        >>> ps.TargetPrompt.named(lm, "token_identity").placeholder
        '?'
        """
        from patchscan.paths import compose_option, config_dir

        cfg = compose_option("patchscope", name)
        if cfg is None or not cfg.get("target_prompt"):
            raise UserError(
                f"no patchscope config with one target prompt named {name!r} in {config_dir() / 'patchscope'}"
            )
        return cls(
            lm, cfg["target_prompt"], placeholder=cfg["placeholder"], occurrence=cfg.get("placeholder_occurrence")
        )

    def __repr__(self) -> str:
        return f"TargetPrompt({self.text!r}, placeholder={self.placeholder!r}, position={self.position})"

    def patch(
        self,
        state: State | torch.Tensor,
        layer: int | None = None,
        position: int | None = None,
        site: str | None = None,
        allow_other_model: bool = False,
    ) -> Patch:
        """Patch `state` into block `layer` (ℓ*; default: the State's own block, ℓ* = ℓ) at the
        placeholder (or at `position`), at `site` of that block (default: the State's own site;
        resid_post for a bare tensor). A State of another model needs `allow_other_model=True`.

        A state read at one site may be patched into another (an MLP output into the residual, say):
        the vector is written as is. At "mlp_out" or "attn_out" it replaces that module's output at
        the position (the residual then adds it), exactly as a forward hook on the module would; at
        "mlp_in" it is what the MLP reads; at "resid_mid" it replaces the residual between attention
        and MLP, so the MLP's input and the block's output both see it.

        >>> import patchscan as ps
        >>> lm = ps.load_model("tiny_llama", device="cpu")
        >>> src = ps.capture(lm, "Paris", layers=[1], positions=[-1], site="mlp_out")
        >>> target = ps.TargetPrompt(lm, "x")
        >>> target.patch(src.at(layer=1)).target_site, target.patch(src.at(layer=1), site="resid_mid").target_site
        ('mlp_out', 'resid_mid')
        """
        vector, source = _vector(self.lm, state, allow_other_model)
        if layer is None and source is None:
            raise UserError("a bare tensor has no block of its own: pass layer= (the target block ℓ*)")
        site = (source.site if source is not None else DEFAULT_SITE) if site is None else site
        self.lm.site(site)  # refused here, in one line, if unknown or not on this family
        return Patch(
            target_ids=self.token_ids,
            target_position=self.position if position is None else position,
            target_layer=self.lm.check_layer(source.layer if layer is None else layer, "target layer"),
            vector=vector,
            target_site=site,
            source=source,
            target_prompt=self.text,
        )

    def baseline(self) -> Patch:
        """This prompt run unpatched."""
        return Patch.baseline(target_ids=self.token_ids, target_position=self.position, target_prompt=self.text)

    def grid(
        self,
        states: States | Iterable[States],
        source_layers: Sequence[int] | str | None = None,
        target_layers: Sequence[int] | str = "same",
        position: int | None = None,
        site: str | None = None,
        allow_other_model: bool = False,
    ) -> list[Patch]:
        """Patches for every (ℓ, ℓ*) pair: each source block `source_layers` (default: all captured)
        into each of `target_layers` ("same": ℓ* = ℓ; or any spec of `patchscan.grids`: "all", a
        list, "0:4"), for each captured States, at `site` of each target block (default: the states' own).

        >>> import patchscan as ps
        >>> lm = ps.load_model("tiny_llama", device="cpu")
        >>> src = ps.capture(lm, "Paris", layers=[0, 1], positions=[-1])
        >>> [(p.source.layer, p.target_layer) for p in ps.TargetPrompt(lm, "x").grid(src, target_layers="all")]
        [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
        """
        many = [states] if isinstance(states, States) else list(states)
        same = isinstance(target_layers, str) and target_layers.strip().lower() == "same"
        targets = None if same else grids.blocks(target_layers, self.lm.n_blocks, "target_layers", self.lm.name)
        patches = []
        for s in many:
            sources = s.layers if source_layers is None else grids.blocks(source_layers, s.n_blocks, "source_layers")
            for layer in sources:
                for t in [layer] if targets is None else targets:
                    state = s.at(layer=layer, position=position)
                    patches.append(self.patch(state, layer=t, site=site, allow_other_model=allow_other_model))
        return patches
