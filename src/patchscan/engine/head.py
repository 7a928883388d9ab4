"""The greedy next token without the full logits (issue 19).

Greedy decoding needs one number per row from the unembedding, its argmax, yet the model's head
computes and writes every row's logits over the whole vocabulary: on SmolLM2 that matmul was 30 %
of a generation grid's time, and ran at 60 % of the speed of the blocks' matmuls because its
(rows x 49,152) output never fits a cache. `GreedyHead` returns exactly the token the model's own
logits would give, computing less:

- the vocabulary is taken in chunks, so each chunk's logits stay in cache and are reduced to a
  running (max, argmax) at once;
- where bf16 matmuls run natively (a CPU with AVX-512 BF16 or AMX; see `models.dtypes`), an fp32
  model's logits are first screened in bf16, several times faster. Each bf16 logit comes with a
  rigorous bound on its distance to the fp32 logit (bf16 rounds inputs and output to 8 bits; the
  products are summed in fp32), and only tokens whose upper bound reaches the best token's lower
  bound, a handful per row, are computed again in fp32. The bf16 logits go into one buffer kept
  between calls (fresh pages cost more than the matmul's output on a CPU), and the bound is first
  tested per block of 512 tokens on the block's best logit, so only the few blocks that can hold
  a candidate are searched token by token. The answer is the fp32 argmax, ties to the
  lowest id, as `argmax` over the model's logits gives it. A self-check of the bf16 kernel (does it
  sum in fp32 and round once?) runs before the screen is first used; where it fails, or for rows
  whose hidden state is not finite, the plain fp32 chunks run instead.

Only model families whose causal-LM logits are `unembed(base_model(...).last_hidden_state)`
(optionally soft-capped, a monotone map kept as the model applies it) use it; others, heads that
accelerate offloads, and models or heads with forward hooks (a user's logit edit must apply) read
the model's own logits.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from patchscan.engine.kv import returned_cache
from patchscan.models.dtypes import cpu_has_native_bf16
from patchscan.models.view import HOOK_DICTS

CHUNK = 4096  # vocabulary rows per CPU matmul: small logits blocks, reduced while still in cache
_BLOCK = 512  # vocabulary rows per block of the screen's coarse test
_SCREEN_BYTES = 64 << 20  # most bf16 logits the screen holds at once (rows are taken in blocks)
_UNIT = 2.0**-8  # bf16 unit roundoff (8 significant bits, round to nearest)
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its GreedyHead


class GreedyHead:
    """`head(hidden)` -> the argmax token of each row of final hidden states (after the final norm)."""

    def __init__(self, unembed: nn.Linear, softcap: float | None = None, screen: bool | None = None):
        self.unembed, self.softcap = unembed, softcap
        weight = unembed.weight
        if screen is None:  # the bf16 screen pays only where bf16 is native (GPUs: not checked here)
            screen = weight.dtype == torch.float32 and weight.device.type == "cpu" and cpu_has_native_bf16()
        self.screen = bool(screen) and not softcap and unembed.bias is None and weight.dtype == torch.float32
        self.chunk = CHUNK if weight.device.type == "cpu" else weight.shape[0]  # a GPU takes the vocabulary at once
        self._screen_key = None
        self._screen_lock = threading.Lock()  # threads sharing a model take the screen in turn

    @classmethod
    def for_view(cls, view, screen: bool | None = None) -> GreedyHead | None:
        """The view's head, made once per model; None where the model's own logits must be read."""
        model = view.model
        unembed = view.unembed
        base = getattr(model, "base_model", None)
        if (
            not view.family.greedy_head  # models.families: logits are unembed(last_hidden_state)
            or base is None
            or base is model
            or type(unembed) is not nn.Linear
            or hasattr(unembed, "_hf_hook")  # offloaded by accelerate: its weight is loaded per call
            or unembed.weight.device.type == "meta"
            or _hooked(model)
            or _hooked(unembed)  # a user's hook there must see the logits it expects
        ):
            return None
        head = _HEADS.get(model)
        if head is None or head.unembed is not unembed or (screen is not None and head.screen != screen):
            head = _HEADS[model] = cls(unembed, view.softcap, screen)
        return head

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.unembed.weight.device)
        if not len(hidden):
            return torch.empty(0, dtype=torch.long, device=hidden.device)
        if self.screen and hidden.dtype == torch.float32 and bool(hidden.isfinite().all()):
            with self._screen_lock:  # its bf16 copies and buffer are remade and written in place
                if self._screen_ready():
                    return self._screened(hidden)
        return self._chunked(hidden)

    def _logits(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The model's logits for vocabulary rows start..stop, computed as its head computes them."""
        bias = self.unembed.bias
        logits = nn.functional.linear(
            hidden, self.unembed.weight[start:stop], None if bias is None else bias[start:stop]
        ).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _chunked(self, hidden: torch.Tensor) -> torch.Tensor:
        """Plain argmax over vocabulary chunks."""
        starts = range(0, self.unembed.weight.shape[0], self.chunk)
        return _running_argmax((s, self._logits(hidden, s, s + self.chunk)) for s in starts)[1]

    # --- the bf16 screen ------------------------------------------------------------------------

    def _screen_ready(self) -> bool:
        """The bf16 copy of the weight (zero rows pad it to whole blocks) and its row norms, remade if
        the weight changed (its tensor version counts in-place edits); False where this machine's bf16
        kernel fails the self-check."""
        weight = self.unembed.weight
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._screen_key:
            self._screen_key = key
            vocab = weight.shape[0]
            padded = -(-vocab // _BLOCK) * _BLOCK
            self._weight_bf16 = torch.zeros(padded, weight.shape[1], dtype=torch.bfloat16, device=weight.device)
            self._weight_bf16[:vocab] = weight.detach()
            self._row_norms = weight.detach().norm(dim=-1) * (1 + 1e-5)
            self._max_norm = self._row_norms.max()
            self._screen_buffer = torch.empty(0, dtype=torch.bfloat16)
            self.screen = self.screen and bf16_sums_in_fp32(weight.device)
        return self.screen

    def _screened(self, hidden: torch.Tensor) -> torch.Tensor:
        """The screen over blocks of rows, so that their bf16 logits stay within `_SCREEN_BYTES`."""
        per_block = max(1, _SCREEN_BYTES // (2 * self._weight_bf16.shape[0]))
        if len(hidden) <= per_block:
            return self._screened_rows(hidden)
        return torch.cat([self._screened_rows(hidden[r : r + per_block]) for r in range(0, len(hidden), per_block)])

    def _screened_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """All bf16 logits in one matmul, into a buffer kept between calls; per row, the best one's
        fp32 lower bound; the vocabulary blocks whose best bf16 logit could reach it (a coarse test
        with the widest bound any token has); in those blocks the tokens that pass it, then each
        token's own bound; those tokens in fp32."""
        weight, norms = self.unembed.weight, self._row_norms
        # |fp32 logit - bf16 logit| <= alpha |w| |h| + beta |bf16 logit|: bf16 inputs (2u + u^2 per
        # product), fp32 sums here and in the reference (2 width 2^-24), one bf16 rounding of the sum.
        alpha = 2 * _UNIT + _UNIT**2 + 2 * hidden.shape[-1] * 2.0**-24
        beta = _UNIT / (1 - _UNIT) + 2.0**-22
        n, vocab, padded = hidden.shape[0], weight.shape[0], self._weight_bf16.shape[0]
        if self._screen_buffer.numel() < n * padded:
            self._screen_buffer = torch.empty(n * padded, dtype=torch.bfloat16, device=hidden.device)
        approx = self._screen_buffer[: n * padded].view(n, padded)
        torch.mm(hidden.to(torch.bfloat16), self._weight_bf16.t(), out=approx)
        approx[:, vocab:] = float("-inf")  # the padding rows are no tokens
        blocks = approx.view(n, padded // _BLOCK, _BLOCK)
        block_top = blocks.amax(-1)  # (rows, blocks)
        top, best_block = block_top.max(-1)
        top_at = best_block * _BLOCK + blocks[torch.arange(n), best_block].argmax(-1)
        top = top.float()
        scale = alpha * hidden.norm(dim=-1) * (1 + 1e-5)  # (rows,)
        lower = top - scale * norms[top_at] - beta * top.abs()  # the best fp32 logit is at least this
        # A token reaches `lower` only if a + scale max|w| + beta |a| >= lower: solved for its bf16 logit a,
        # widened, and rounded down to a bf16 value so the test compares bf16 logits as they are.
        reach = lower - scale * self._max_norm
        coarse = torch.where(reach >= 0, reach / (1 + beta), reach / (1 - beta))
        coarse = (coarse - (1e-6 + _UNIT) * coarse.abs()).to(torch.bfloat16)
        hit_rows, hit_blocks = (block_top >= coarse[:, None]).nonzero(as_tuple=True)
        hits = blocks[hit_rows, hit_blocks]  # (hit blocks, _BLOCK)
        at, offset = (hits >= coarse[hit_rows, None]).nonzero(as_tuple=True)
        rows, tokens, value = hit_rows[at], hit_blocks[at] * _BLOCK + offset, hits[at, offset].float()
        keep = value + scale[rows] * norms[tokens] + beta * value.abs() >= lower[rows]  # each token's own bound
        rows, tokens = rows[keep], tokens[keep]
        candidates, column = tokens.unique(sorted=True, return_inverse=True)
        exact = nn.functional.linear(hidden, weight[candidates]).float()
        masked = torch.full_like(exact, float("-inf"))
        masked[rows, column] = exact[rows, column]
        return candidates[masked.argmax(-1)]


def _running_argmax(chunks: Iterable[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, argmax) per row over (first vocabulary id, logits) chunks; an earlier chunk keeps a tie,
    as argmax over the whole row does."""
    best_value = best_index = None
    for start, logits in chunks:
        value, index = logits.max(-1)
        if best_value is None:
            best_value, best_index = value, index + start
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + start, best_index)
    return best_value, best_index


def _hooked(module: nn.Module) -> bool:
    """Does a forward hook act on this module's call (its own, or one on every module)?"""
    from torch.nn.modules import module as torch_module

    own = any(getattr(module, name) for name in HOOK_DICTS)
    return bool(own or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def bf16_sums_in_fp32(device: torch.device) -> bool:
    """Does this device's bf16 matmul sum in fp32 and round once (the screen's bound assumes so)?"""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 512, generator=gen).to(device, torch.bfloat16)
    b = torch.randn(512, 256, generator=gen).to(device, torch.bfloat16)
    ref = a.float() @ b.float()
    got = (a @ b).float()
    return bool(((got - ref).abs() <= _UNIT * ref.abs() * 1.01 + 1e-6).all())


def last_logits(view, model_kwargs: dict) -> tuple[torch.Tensor, object]:
    """(the model's own logits at each row's last position, as float32; the KV cache) of one forward."""
    out = view.model(**model_kwargs, logits_to_keep=1)
    return out.logits[:, -1].float(), returned_cache(out)


def next_tokens(view, head: GreedyHead | None, model_kwargs: dict) -> tuple[torch.Tensor, object]:
    """(argmax token of each row's last position, the KV cache) of one forward: through the base
    model and `head` when there is one, else through the model's own logits."""
    if head is None:
        logits, kv = last_logits(view, model_kwargs)
        return logits.argmax(-1), kv
    out = view.model.base_model(**model_kwargs)
    return head(out.last_hidden_state[:, -1]), returned_cache(out)
