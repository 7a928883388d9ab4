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
from patchscan.engine import scoring
from patchscan.errors import UserError
from patchscan.models.view import ModelView

MAX_NEW_TOKENS = 100_000  # more is a mistake (a 1e9-token KV cache), refused before any allocation


def _checked(lm: ModelView, patches: Sequence[Patch]) -> list[Patch]:
    """The patches, each checked against `lm` where it enters: target ids in its vocabulary, the
    vector one state of its width (`ModelView.check_state`), so a hand-made Patch is checked too."""
    if isinstance(patches, engine.Patch):
        patches = [patches]
    patches = list(patches)
    if not patches:
        raise UserError("no patches to run: pass a list of patches (TargetPrompt.patch, .baseline or .grid)")
    bad = [p for p in patches if not isinstance(p, engine.Patch)]
    if bad:
        raise UserError(f"expected Patch objects (TargetPrompt.patch), got {type(bad[0]).__name__}")
    for k, p in enumerate(patches):
        lm.check_token_ids(p.target_ids, f"target ids of patch {k}")
        if p.vector is not None:
            lm.check_state(p.vector, f"vector of patch {k}")
    return patches


def _count(value, name: str, most: int, why: str) -> int:
    """A whole number from 1 to `most` (`why` says where the bound comes from)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise UserError(f"{name}={value!r} is not valid; use a whole number from 1 to {most} ({why})")
    return value


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
    patches = _checked(lm, patches)
    top_k = _count(top_k, "top_k", lm.vocab_size, f"{lm.name}'s vocabulary")
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
    patches = _checked(lm, patches)
    max_new_tokens = _count(max_new_tokens, "max_new_tokens", MAX_NEW_TOKENS, "tokens generated per patch")
    tokens = engine.generate(lm, patches, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return GenerationResult(lm, patches, tokens)


def continuation_logprobs(
    lm: ModelView, patches: Sequence[Patch], continuations: Sequence[Sequence[int]], batch_size: int = 8
) -> list[list[float]]:
    """Log-probabilities of given continuations of patched target prompts (engine.scoring: one plain
    forward per batch over prompt + continuation with each patch hooked in).

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> p = ps.TargetPrompt(lm, "hello x", placeholder="x").baseline()
    >>> [round(x, 3) <= 0 for x in ps.readouts.continuation_logprobs(lm, [p], [[42, 7]])[0]]
    [True, True]

    The same patch at the same position in a full forward gives what generation computed with the
    patch in its prefill, since later positions see it only through attention.
    """
    return scoring.continuation_logprobs(lm, _checked(lm, patches), continuations, batch_size)
