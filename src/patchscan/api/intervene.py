"""The escape hatch: overwrite block outputs (or another site) at token positions during any plain Hugging Face call.

For what `next_token` and `generate` do not cover (sampling, beam search, a custom loss, another
library's loop): inside `with ps.overwrite(lm, ...)` every call of `lm.model` sees the block
outputs replaced. One hook per block, removed on exit (exactly the handles it registered).
`edit_blocks` is the callback form (baukit's `edit_output`): a function of each block's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from patchscan.api.states import State
from patchscan.engine.hooks import hidden_of, overwritten, site_hooks, with_hidden
from patchscan.errors import UserError
from patchscan.models.families import DEFAULT_SITE
from patchscan.models.view import ModelView

Edits = Mapping[tuple[int, int], "torch.Tensor | State"]


def _edit_hook(edits: list[tuple[int, torch.Tensor]], every_call: bool):
    """A forward hook writing `vector` at `position` of every row (or row k of a (rows, width) vector)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] > 1 and not every_call:  # generate: the prefill is the first call
            return output
        length = hidden_of(output).shape[1]
        for position, vector in edits:
            if not -length <= position < length:
                if calls["n"] == 1:
                    raise UserError(f"position {position} is out of range for a call on {length} tokens")
                continue
            output = overwritten(output, slice(None), position, vector)
        return output

    return hook


@contextmanager
def overwrite(
    lm: ModelView,
    edits: Edits | None = None,
    *,
    layer: int | None = None,
    position: int | None = None,
    vector: torch.Tensor | State | None = None,
    every_call: bool = False,
    site: str = DEFAULT_SITE,
) -> Iterator[None]:
    """Overwrite the output of block `layer` at token `position` with `vector` during plain calls.

    >>> import patchscan as ps, torch
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> ids = torch.tensor([lm.encode("The Eiffel Tower is in")])
    >>> with ps.overwrite(lm, layer=1, position=-1, vector=torch.zeros(lm.width)):
    ...     patched = lm.model(input_ids=ids).logits
    >>> plain = lm.model(input_ids=ids).logits
    >>> torch.equal(patched[0, :-1], plain[0, :-1]), torch.equal(patched[0, -1], plain[0, -1])
    (True, False)

    Several at once: `overwrite(lm, {(layer, position): vector, ...})`. A vector of shape (width,)
    goes into every row, one of shape (rows, width) row by row; a `State` gives its vector.
    Positions index the tokens of the call (negative: from the end, which stays exact under left
    padding). By default only the first call is edited, so in `lm.model.generate(...)` the patch
    acts in the prefill and later tokens see it through the KV cache, as in `ps.generate`;
    `every_call=True` edits every call.

    `site` overwrites another site of each named block instead of its output (models.families.SITES:
    "mlp_out" replaces the MLP module's output there, as a forward hook on it would; "resid_mid" the
    residual between attention and MLP, which the MLP and the block's sum both see; see
    `TargetPrompt.patch`). A vector read at one site may be written at another.
    """
    if edits is None:
        if layer is None or position is None or vector is None:
            raise UserError("overwrite needs edits={(layer, position): vector} or layer=, position= and vector=")
        edits = {(layer, position): vector}
    by_block: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (block, pos), vec in edits.items():
        if not isinstance(vec, (State, torch.Tensor)):
            try:
                vec = torch.as_tensor(vec)
            except (TypeError, ValueError, RuntimeError):
                pass  # check_state names it
        vec = lm.check_state(vec, "vector", (1, 2))
        by_block.setdefault(lm.check_layer(int(block)), []).append((int(pos), vec))
    hooks = {block: _edit_hook(block_edits, every_call) for block, block_edits in by_block.items()}
    with site_hooks(lm.blocks, lm.site(site), hooks):
        yield


@contextmanager
def edit_blocks(
    lm: ModelView,
    edit: Callable[[torch.Tensor, int], torch.Tensor],
    layers: Sequence[int] | None = None,
    site: str = DEFAULT_SITE,
) -> Iterator[None]:
    """Replace block outputs by `edit(hidden, layer)` during plain calls (every call, every position).

    >>> import patchscan as ps, torch
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> ids = torch.tensor([lm.encode("The Eiffel Tower is in")])
    >>> with ps.edit_blocks(lm, lambda hidden, layer: 0 * hidden, layers=[3]):
    ...     logits = lm.model(input_ids=ids).logits
    >>> torch.allclose(logits[0, 0], logits[0, -1])  # the last block's output zeroed: one read-out for all
    True

    `hidden` is the block's output of shape (rows, tokens, width), before the final norm; return a
    tensor of the same shape. `layers` default to every block. `site` edits another site of each
    block instead (models.families.SITES, as in `overwrite`): `hidden` is then that site's tensor.
    """

    def hook_for(layer: int):
        def hook(module, inputs, output):
            return with_hidden(output, edit(hidden_of(output), layer))

        return hook

    blocks = range(lm.n_blocks) if layers is None else [lm.check_layer(int(b)) for b in layers]
    with site_hooks(lm.blocks, lm.site(site), {b: hook_for(b) for b in blocks}):
        yield
