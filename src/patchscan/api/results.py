"""What `next_token` and `generate` return: decoded text, token ids, log-probs, and a DataFrame.

One row per patch, labelled with where its vector came from (source tokens, position i, block ℓ)
and where it went (target tokens, position i*, block ℓ*) by the Parquet rows' own schema
(`rows.patch_columns`, DESIGN §5), then its source text, target prompt and `patched`. pandas is
imported only by `to_frame`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patchscan import grids
from patchscan.api.targets import Patch
from patchscan.engine.scoring import continuation_logprobs
from patchscan.models.view import ModelView
from patchscan.runs.row_schema import frame, patch_columns


def _labels(lm: ModelView, patch: Patch) -> dict:
    """One patch in the row contract's columns (`rows.patch_columns`), with its source text, target
    prompt and whether it is patched at all."""
    source = getattr(patch, "source", None)
    baseline = patch.vector is None
    return {
        **patch_columns(
            source_token_ids=None if source is None else source.token_ids,
            source_position=None if source is None else source.position,
            source_layer=None if source is None else source.layer,
            target_token_ids=patch.target_ids,
            target_position=grids.position(patch.target_position, len(patch.target_ids), "target position"),
            target_layer=None if baseline else lm.check_layer(patch.target_layer),
            source_site=None if source is None else source.site,
            target_site=None if baseline else patch.target_site,
        ),
        "source_text": None if source is None else source.text,
        "target_prompt": getattr(patch, "target_prompt", None) or lm.decode(patch.target_ids),
        "patched": not baseline,
    }


@dataclass
class NextTokenResult:
    """The next token after each patched target prompt: its top-k tokens and their log-probs.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> target = ps.TargetPrompt(lm, "hello -> hello\\n?", placeholder="?")
    >>> src = ps.capture(lm, "Paris", layers=[1], positions=[-1])
    >>> result = ps.next_token(lm, [target.baseline(), target.patch(src.at(layer=1), layer=1)], top_k=3)
    >>> len(result), len(result.texts), tuple(result.top_ids.shape)
    (2, 2, (2, 3))
    >>> list(result.to_frame().columns[:4])
    ['source_token_ids', 'source_position', 'source_layer', 'target_token_ids']

    `token_ids[k]`, `texts[k]` and `logprobs[k]` are the most likely next token of patch k, its
    text and its log-probability (natural log); `top_ids`/`top_logprobs` hold the top k.
    """

    lm: ModelView = field(repr=False)
    patches: list[Patch] = field(repr=False)
    top_ids: torch.Tensor  # (n, k)
    top_logprobs: torch.Tensor  # (n, k)

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def token_ids(self) -> list[int]:
        return self.top_ids[:, 0].tolist()

    @property
    def logprobs(self) -> list[float]:
        return self.top_logprobs[:, 0].tolist()

    @property
    def texts(self) -> list[str]:
        return [self.lm.tokenizer.decode([t]) for t in self.token_ids]

    def to_frame(self):
        """One row per patch: its labels, `pred_token_id`, `pred_token`, `logprob` and `top_k` tokens."""
        rows = []
        for k, patch in enumerate(self.patches):
            top = [self.lm.tokenizer.decode([t]) for t in self.top_ids[k].tolist()]
            rows.append(
                {
                    **_labels(self.lm, patch),
                    "pred_token_id": self.token_ids[k],
                    "pred_token": top[0],
                    "logprob": self.logprobs[k],
                    "top_k": top,
                }
            )
        return frame(rows)


@dataclass
class GenerationResult:
    """Greedy continuations of patched target prompts.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> target = ps.TargetPrompt(lm, "Syria: Country in the Middle East, x", placeholder="x")
    >>> src = ps.capture(lm, "Paris", layers=[2], positions=[-1])
    >>> result = ps.generate(lm, [target.patch(src.at(layer=2), layer=2)], max_new_tokens=4)
    >>> len(result.token_ids[0]), len(result.logprobs[0]), isinstance(result.texts[0], str)
    (4, 4, True)

    `token_ids[k]` are the generated tokens of patch k (an end-of-sequence token ends it and is
    kept), `texts[k]` their text. `logprobs[k]` (the log-probability of each generated token) are
    computed on first use, by one patched forward over prompt and continuation.
    """

    lm: ModelView = field(repr=False)
    patches: list[Patch] = field(repr=False)
    token_ids: list[list[int]]
    _logprobs: list[list[float]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def texts(self) -> list[str]:
        return [self.lm.decode(ids) for ids in self.token_ids]

    @property
    def logprobs(self) -> list[list[float]]:
        if self._logprobs is None:
            self._logprobs = continuation_logprobs(self.lm, self.patches, self.token_ids)
        return self._logprobs

    def to_frame(self):
        """One row per patch: its labels, `generation`, `token_ids` and `logprob` (their sum)."""
        rows = [
            {
                **_labels(self.lm, patch),
                "generation": text,
                "token_ids": ids,
                "logprob": float(sum(lps)),
            }
            for patch, text, ids, lps in zip(self.patches, self.texts, self.token_ids, self.logprobs)
        ]
        return frame(rows)
