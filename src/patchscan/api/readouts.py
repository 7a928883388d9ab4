"""Run lists of patches through the batched engine and read out what the model says.

`next_token` and `generate` take any mix of patches (different blocks, prompts, baselines): the
engine groups rows that share a target prompt, computes the prefix before i* once, and skips
the blocks a next-token read-out does not need. Results come back in the order of the patches.
"""

from __future__ import annotations

from collections.abc import Sequence

from patchscan import engine
from patchscan.api.results import GenerationResult, NextTokenResult
from patchscan.api.targets import Patch
from patchscan.engine.scoring import continuation_logprobs  # noqa: F401 - public as ps.readouts.continuation_logprobs
from patchscan.errors import UserError
from patchscan.models.view import ModelView


def _checked(patches: Sequence[Patch]) -> list[Patch]:
    patches = list(patches)
    if not patches:
        raise UserError("no patches to run: pass a list of patches (TargetPrompt.patch, .baseline or .grid)")
    bad = [p for p in patches if not isinstance(p, engine.Patch)]
    if bad:
        raise UserError(f"expected Patch objects (TargetPrompt.patch), got {type(bad[0]).__name__}")
    return patches


def next_token(
    lm: ModelView, patches: Sequence[Patch], top_k: int = 5, batch_size: int | str | None = 256
) -> NextTokenResult:
    """The next token at the end of each patched target prompt (top-k, with log-probs).

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> target = ps.TargetPrompt(lm, "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?", placeholder="?")
    >>> src = ps.capture(lm, "The Eiffel Tower", layers=[1, 2], positions=[-1])
    >>> result = ps.next_token(lm, target.grid(src) + [target.baseline()])
    >>> len(result), result.to_frame()["patched"].tolist()
    (3, [True, True, False])

    `batch_size` rows run per forward ("auto": from free GPU memory); the outcome does not depend
    on it.
    """
    patches = _checked(patches)
    top = engine.patched_next_token(lm, patches, top_k=top_k, batch_size=batch_size)
    return NextTokenResult(lm, patches, top.ids, top.logprobs)


def generate(
    lm: ModelView, patches: Sequence[Patch], max_new_tokens: int = 20, batch_size: int | str | None = 256
) -> GenerationResult:
    """Greedy continuations of the patched target prompts (the patch acts in the prefill only).

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> desc = ps.TargetPrompt(lm, "Syria: Country in the Middle East, x", placeholder="x")
    >>> src = ps.capture(lm, "Diana, Princess of Wales", layers=[1], positions=[-1])
    >>> result = ps.generate(lm, [desc.patch(src.at(layer=1), layer=1), desc.baseline()], max_new_tokens=5)
    >>> [len(ids) for ids in result.token_ids]
    [5, 5]

    A row stops after an end-of-sequence token (kept) or `max_new_tokens` tokens.
    """
    patches = _checked(patches)
    tokens = engine.generate(lm, patches, max_new_tokens=int(max_new_tokens), batch_size=batch_size)
    return GenerationResult(lm, patches, tokens)
