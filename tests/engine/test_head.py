"""The greedy head (engine.head) gives exactly the argmax of the model's own logits, with and
without the bf16 screen, on every tiny architecture, on near-ties and on soft-capped logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patchscan.engine import Patch, capture, generate
from patchscan.engine import head as head_module
from patchscan.engine.head import CHUNK, GreedyHead, bf16_sums_in_fp32
from tests.conftest import tiny


def final_hidden(view, texts: list[str]) -> torch.Tensor:
    """Final-norm outputs at every position of some prompts (what the head reads)."""
    rows = []
    for text in texts:
        out = view.model.base_model(input_ids=torch.tensor([view.encode(text)]))
        rows.append(out.last_hidden_state[0])
    return torch.cat(rows)


def model_argmax(view, hidden):
    logits = view.unembed(hidden).float()
    if view.softcap:
        logits = torch.tanh(logits / view.softcap) * view.softcap
    return logits.argmax(-1)


@pytest.mark.parametrize("screen", [False, True])
def test_head_equals_the_models_argmax(family_view, screen):
    view = family_view
    head = GreedyHead.for_view(view, screen=screen)
    assert head is not None, view.model.config.model_type
    hidden = final_hidden(view, ["The Eiffel Tower is in Paris, France.", "1 2 3 4 5 6 7", "cat -> cat\nhello ->"])
    hidden = torch.cat([hidden, 40 * torch.randn(64, view.width, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(head(hidden), model_argmax(view, hidden))


@pytest.mark.parametrize("rows_at_once", [None, 7])
def test_screen_is_exact_on_near_ties_and_large_vocabularies(rows_at_once, monkeypatch):
    """A random 3-chunk unembedding with planted near-ties one fp32 step apart, in the best token's
    block of the coarse test or in another: bf16 cannot tell them apart, the fp32 recheck must;
    also when the screen takes the rows a few at a time."""
    if not bf16_sums_in_fp32(torch.device("cpu")):
        pytest.skip("this CPU's bf16 matmul does not sum in fp32: the screen stays off here (tested below)")
    gen = torch.Generator().manual_seed(1)
    vocab, width = 3 * CHUNK + 17, 96
    if rows_at_once:  # the screen's buffer holds this many rows of bf16 logits (padded vocabulary)
        padded = -(-vocab // head_module._BLOCK) * head_module._BLOCK
        monkeypatch.setattr(head_module, "_SCREEN_BYTES", rows_at_once * 2 * padded)
    unembed = nn.Linear(width, vocab, bias=False)
    unembed.weight.data = torch.randn(vocab, width, generator=gen) / width**0.5
    hidden = torch.randn(40, width, generator=gen) * 8
    # plant, for each row, a rival token whose logit is within a few fp32 ulps of the row's best
    best = (hidden @ unembed.weight.T).argmax(-1)
    for r, b in enumerate(best.tolist()):
        rival = (b + 1 + 3 * r + (r % 3 == 0) * 2 * head_module._BLOCK) % vocab
        unembed.weight.data[rival] = unembed.weight.data[b] * (1 + (-1) ** r * 2e-7)
    expected = (hidden @ unembed.weight.T).argmax(-1)
    bf16_only = (hidden.bfloat16() @ unembed.weight.bfloat16().T).float().argmax(-1)
    assert not torch.equal(bf16_only, expected)  # the planted ties defeat bf16 alone
    plain, screened = GreedyHead(unembed, screen=False), GreedyHead(unembed, screen=True)
    assert screened.screen
    assert torch.equal(plain(hidden), expected)
    assert torch.equal(screened(hidden), expected)
    assert screened(hidden[:0]).shape == (0,)


def test_screen_follows_edits_of_the_weight():
    """The bf16 copy is remade when the unembedding is edited in place (never a stale screen)."""
    gen = torch.Generator().manual_seed(2)
    unembed = nn.Linear(32, 500, bias=False)
    hidden = torch.randn(8, 32, generator=gen)
    head = GreedyHead(unembed, screen=True)
    head(hidden)
    with torch.no_grad():
        unembed.weight.mul_(-1)
    assert torch.equal(head(hidden), (hidden @ unembed.weight.T).argmax(-1))


def test_screen_is_off_where_bf16_is_not_native_or_logits_are_capped(monkeypatch):
    gemma, llama = tiny("tiny_gemma3"), tiny("tiny_llama")
    assert not GreedyHead(gemma.unembed, gemma.softcap, screen=True).screen  # soft-capped: the plain chunks
    monkeypatch.setattr("patchscan.engine.head.cpu_has_native_bf16", lambda: False)
    assert not GreedyHead(llama.unembed).screen
    monkeypatch.setattr("patchscan.engine.head.cpu_has_native_bf16", lambda: True)
    assert GreedyHead(llama.unembed).screen


def test_screen_turns_off_when_the_bf16_kernel_fails_its_self_check(monkeypatch):
    llama = tiny("tiny_llama")
    monkeypatch.setattr("patchscan.engine.head.bf16_sums_in_fp32", lambda device: False)
    head = GreedyHead(llama.unembed, screen=True)
    hidden = final_hidden(llama, ["The Eiffel Tower is in Paris"])
    assert torch.equal(head(hidden), model_argmax(llama, hidden))
    assert not head.screen


@pytest.mark.parametrize("screen", [False, True])
def test_generation_through_the_head_equals_the_modelsmodel_argmax(view, screen, monkeypatch):
    """Whole greedy continuations with the head equal those read from the model's own logits."""
    ids = tuple(view.encode("Syria: Country in the Middle East, x"))
    caps = capture(view, [view.encode("Diana, Princess of Wales")], list(range(view.n_blocks)), [[-1]])[0]
    patches = [
        Patch(target_ids=ids, target_position=len(ids) - 1, target_layer=t, vector=caps.states[s, 0])
        for s in range(view.n_blocks)
        for t in range(view.n_blocks)
    ]
    head = GreedyHead.for_view(view, screen=screen)
    monkeypatch.setattr(GreedyHead, "for_view", classmethod(lambda cls, v, screen=None: head))
    with_head = generate(view, patches, max_new_tokens=6)
    monkeypatch.setattr(GreedyHead, "for_view", classmethod(lambda cls, v, screen=None: None))
    assert with_head == generate(view, patches, max_new_tokens=6)


def test_a_hook_on_the_head_or_the_model_keeps_the_modelsmodel_argmax():
    """A user's hook that edits the logits must apply, so generation then reads the model's own logits."""
    lm = tiny("tiny_llama")
    assert GreedyHead.for_view(lm) is not None
    ids = tuple(lm.encode("The Eiffel Tower is in"))
    patches = [Patch(target_ids=ids, target_position=len(ids) - 1, target_layer=1, vector=torch.zeros(lm.width))]
    banned = generate(lm, patches, max_new_tokens=1)[0][0]

    def ban(module, inputs, output):
        output = output.clone()
        output[..., banned] = float("-inf")
        return output

    handle = lm.unembed.register_forward_hook(ban)
    try:
        assert GreedyHead.for_view(lm) is None
        assert generate(lm, patches, max_new_tokens=1)[0][0] != banned
    finally:
        handle.remove()
    handle = lm.model.register_forward_pre_hook(lambda module, args: None)
    try:
        assert GreedyHead.for_view(lm) is None
    finally:
        handle.remove()


def test_threads_sharing_a_screened_head_get_their_own_tokens():
    """The screen keeps one bf16 buffer per head: two threads reading tokens at once must not mix
    each other's logits."""
    import threading

    gen = torch.Generator().manual_seed(3)
    unembed = nn.Linear(256, 20000, bias=False)
    head = GreedyHead(unembed, screen=True)
    inputs = [torch.randn(300 + 200 * k, 256, generator=gen) * (k + 1) for k in range(2)]
    expected = [(h @ unembed.weight.T).argmax(-1) for h in inputs]
    wrong = []

    def read(k: int) -> None:
        for _ in range(20):
            try:
                if not torch.equal(head(inputs[k]), expected[k]):
                    wrong.append((k, "wrong tokens"))
            except Exception as error:  # noqa: BLE001 (a thread's error must reach the assertion)
                wrong.append((k, repr(error)))

    threads = [threading.Thread(target=read, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
