"""Scoring given continuations of patched target prompts: engine work that the API's results call on
first use (`GenerationResult.logprobs`), kept here so results and readouts need not import each other."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from patchscan.engine.capture import pad_batch
from patchscan.engine.hooks import grouped_patch_hooks, site_hooks
from patchscan.models.view import ModelView


@torch.no_grad()
def continuation_logprobs(
    lm: ModelView, patches: Sequence, continuations: Sequence[Sequence[int]], batch_size: int = 8
) -> list[list[float]]:
    """Log-probabilities of given continuations of patched target prompts, by one plain forward per
    batch over prompt + continuation with each patch hooked in at its site (right padding: positions
    exact). The public face, with its example, is `ps.readouts.continuation_logprobs`."""
    resolved = [p.resolved(lm) for p in patches]
    out: list[list[float]] = []
    pad = lm.tokenizer.pad_token_id or 0
    for start in range(0, len(resolved), batch_size):
        batch = resolved[start : start + batch_size]
        conts = [list(c) for c in continuations[start : start + batch_size]]
        ids, mask = pad_batch([list(p.target_ids) + c for p, c in zip(batch, conts)], pad)
        patched = [k for k, p in enumerate(batch) if p.vector is not None]
        with contextlib.ExitStack() as hooked:
            for site in sorted({batch[k].target_site for k in patched}):  # each site's rows hooked at that site
                rows = [k for k in patched if batch[k].target_site == site]
                vectors = torch.stack([batch[k].vector.to(lm.device) for k in rows])
                layers = [batch[k].target_layer for k in rows]
                hooks = grouped_patch_hooks(layers, rows, [batch[k].target_position for k in rows], vectors)
                hooked.enter_context(site_hooks(lm.blocks, lm.site(site), hooks))
            logits = lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device)).logits
        for k, (p, c) in enumerate(zip(batch, conts)):
            first = len(p.target_ids) - 1
            rows = torch.log_softmax(logits[k, first : first + len(c)].float(), dim=-1)
            out.append(rows.gather(1, torch.tensor(c, device=rows.device)[:, None]).squeeze(1).tolist())
    return out
