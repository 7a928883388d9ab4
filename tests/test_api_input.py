"""Bad input to the public API (`import patchscan as ps`) is one UserError line naming the bad value,
and nothing is patched where the caller did not mean it (issue 27: the API's silent-wrong cases)."""

from __future__ import annotations

import pytest
import torch

import patchscan as ps
from tests.conftest import tiny

ARCHS = ["tiny_llama", "tiny_gpt2"]


def one_line(call, match: str) -> ps.UserError:
    with pytest.raises(ps.UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)
    return info.value


def token_index_after(lm, prefix: str) -> int:
    """The index of the last token of `prefix`, counted independently of patchscan.prompts: the
    tokens of the prompt's start up to the placeholder (BOS included where the tokenizer adds one)."""
    return len(lm.tokenizer(prefix)["input_ids"]) - 1


# ---------------------------------------------------------------- the placeholder is a token, not a letter


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize(
    "prompt,prefix",
    [("Look at x and explain", "Look at x"), ("Tell me about x. Next: the fox", "Tell me about x")],
)
def test_placeholder_is_the_word_x_not_a_letter_of_a_later_word(name, prompt, prefix):
    lm = tiny(name)
    target = ps.TargetPrompt(lm, prompt)
    assert target.position == token_index_after(lm, prefix)
    assert target.placeholder_token.strip() == "x"


@pytest.mark.parametrize("name", ARCHS)
def test_the_patch_lands_on_the_placeholder_token(name):
    lm = tiny(name)
    target = ps.TargetPrompt(lm, "Look at x and explain")
    at = token_index_after(lm, "Look at x")
    vector = 10 * torch.randn(lm.width, generator=torch.Generator().manual_seed(0))
    patch = target.patch(vector, layer=1)
    got = ps.next_token(lm, [patch], top_k=3)
    ids = torch.tensor([list(target.token_ids)])
    with ps.overwrite(lm, layer=1, position=at, vector=vector):
        expected = lm.model(input_ids=ids).logits[0, -1].float().topk(3).indices.tolist()
    assert patch.target_position == at and got.top_ids[0].tolist() == expected


def test_a_placeholder_inside_a_word_is_not_the_placeholder():
    lm = tiny("tiny_llama")
    one_line(lambda: ps.TargetPrompt(lm, "Play the xylophone"), r"does not contain the placeholder 'x'")
    assert ps.TargetPrompt(lm, "A xylophone and x").position == token_index_after(lm, "A xylophone and x")


def test_placeholder_not_found_names_placeholder_and_prompt():
    lm = tiny("tiny_llama")
    one_line(lambda: ps.TargetPrompt(lm, "no marker here", placeholder="?"), r"'no marker here'.*placeholder '\?'")


def test_an_ambiguous_placeholder_is_refused_showing_the_candidates_unless_one_is_chosen():
    lm = tiny("tiny_llama")
    prompt = "Compare x with x"
    err = one_line(lambda: ps.TargetPrompt(lm, prompt), r"occurs 2 times")
    assert "character 8" in str(err) and "character 15" in str(err) and "occurrence=" in str(err)
    assert ps.TargetPrompt(lm, prompt, occurrence=-1).position == token_index_after(lm, prompt)
    assert ps.TargetPrompt(lm, prompt, occurrence=0).position == token_index_after(lm, "Compare x")
    one_line(lambda: ps.TargetPrompt(lm, prompt, occurrence=2), r"occurrence=2 .* occurs 2 time")


def test_shipped_target_prompts_have_one_placeholder():
    """The default placeholder_occurrence (null: must be unique) keeps every shipped prompt working."""
    from patchscan.paths import compose_option
    from patchscan.prompts import word_spans

    for name in ("token_identity", "entity_description", "attribute"):
        cfg = compose_option("patchscope", name)
        assert cfg.get("placeholder_occurrence") is None
        prompts = [cfg["target_prompt"]] if cfg.get("target_prompt") else list(cfg["target_prompts"].values())
        for prompt in prompts:
            assert len(word_spans(prompt, cfg["placeholder"])) == 1, (name, prompt)
