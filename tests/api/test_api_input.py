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
    """The index of the last token of `prefix`, counted independently of patchscan.experiments.prompts: the
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
    from patchscan.experiments.prompts import word_spans
    from patchscan.paths import compose_option

    for name in ("token_identity", "entity_description", "attribute"):
        cfg = compose_option("patchscope", name)
        assert cfg.get("placeholder_occurrence") is None
        prompts = [cfg["target_prompt"]] if cfg.get("target_prompt") else list(cfg["target_prompts"].values())
        for prompt in prompts:
            assert len(word_spans(prompt, cfg["placeholder"])) == 1, (name, prompt)


# ---------------------------------------------------------------- values checked where they enter


def test_max_new_tokens_zero_negative_or_absurd_is_refused():
    lm = tiny("tiny_llama")
    patches = [ps.TargetPrompt(lm, "about x").baseline()]
    for bad in (0, -2, 1_000_000_000, 2.5):
        one_line(lambda bad=bad: ps.generate(lm, patches, max_new_tokens=bad), rf"max_new_tokens={bad!r} is not valid")


def test_patched_vector_of_another_width_or_two_dimensional_is_refused_at_every_entry_point():
    lm = tiny("tiny_llama")
    target = ps.TargetPrompt(lm, "about x")
    one_line(lambda: target.patch(torch.zeros(lm.width + 3), layer=1), rf"width {lm.width + 3} .*width {lm.width}")
    one_line(lambda: target.patch(torch.zeros(2, lm.width), layer=1), rf"shape \(2, {lm.width}\)")
    one_line(lambda: target.patch(torch.zeros(lm.width, dtype=torch.long), layer=1), "floating")
    by_hand = ps.Patch(target_ids=target.token_ids, target_position=-1, target_layer=1, vector=torch.zeros(5))
    one_line(lambda: ps.next_token(lm, [by_hand]), r"vector of patch 0 has width 5")
    one_line(lambda: ps.generate(lm, [by_hand], max_new_tokens=2), r"vector of patch 0 has width 5")

    def overwrite():
        with ps.overwrite(lm, layer=1, position=0, vector=torch.zeros(3)):
            pass

    one_line(overwrite, "width 3")


def test_lenses_refuse_a_state_of_another_width():
    lm, wide = tiny("tiny_llama"), tiny("tiny_llama_wide")
    state = ps.capture(wide, "Paris", layers=[1], positions=[-1]).at(layer=1)
    one_line(lambda: ps.LogitLens(lm)(state), rf"width {wide.width} .*, but tiny_llama's states have width {lm.width}")
    lens = ps.AffineLens(lm, {1: ps.engine.Affine.fit(torch.randn(100, lm.width), torch.randn(100, lm.width))})
    one_line(lambda: lens(state), rf"width {wide.width}")
    one_line(lambda: ps.LogitLens(lm).top_tokens("Paris"), "must be a State or a tensor, not str")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda lm: ps.load_model(123), "load_model takes a model name, a path or a model config.*123"),
        (lambda lm: ps.capture(lm, 42), "capture takes a text or a list of texts, not 42"),
        (lambda lm: ps.capture(lm, ["Paris", 7]), r"not \['Paris', 7\]"),
        (lambda lm: ps.AffineLens.fit(lm, []), r"AffineLens.fit needs a non-empty list of texts.*\[\]"),
        (lambda lm: ps.AffineLens.fit(lm, "one text"), "AffineLens.fit needs a non-empty list of texts"),
        (lambda lm: ps.next_token(lm, [ps.TargetPrompt(lm, "x").baseline()], top_k=10**6), "top_k=1000000"),
        (lambda lm: ps.next_token(lm, [ps.TargetPrompt(lm, "x").baseline()], top_k=0), "top_k=0"),
        (
            lambda lm: ps.next_token(
                lm, [ps.Patch(target_ids=(1, lm.vocab_size + 5), target_position=-1, target_layer=1, vector=None)]
            ),
            r"target ids of patch 0 hold 49157: tiny_llama's token ids are 0\.\.49151",
        ),
        (lambda lm: ps.load_model("tiny_llama", device="nonsense"), "unknown device 'nonsense'"),
    ],
)
def test_bad_api_values_are_one_line(call, match):
    one_line(lambda: call(tiny("tiny_llama")), match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_load_model_on_cuda_without_a_gpu_is_one_line():
    one_line(lambda: ps.load_model("tiny_llama", device="cuda"), "device='cuda' but no CUDA GPU is available")


# ---------------------------------------------------------------- a State knows its model


def test_a_state_of_another_model_needs_allow_other_model():
    a, b = tiny("tiny_llama"), tiny("tiny_qwen2")
    assert a.width == b.width  # the same width: nothing else would catch it
    src = ps.capture(a, "The Eiffel Tower", layers=[1], positions=[-1])
    target = ps.TargetPrompt(b, "about x")
    one_line(lambda: target.patch(src.at(layer=1)), "captured from 'tiny_llama', not from 'tiny_qwen2'")
    one_line(lambda: target.grid(src), "allow_other_model=True")
    patch = target.patch(src.at(layer=1), allow_other_model=True)
    assert patch.source.model == "tiny_llama" and len(ps.next_token(b, [patch])) == 1
    assert len(target.grid(src, allow_other_model=True)) == 1
    mapped = src.at(layer=1).map(lambda v: 2 * v, model=b)  # a mapped state belongs to the model mapped into
    assert mapped.model == "tiny_qwen2" and target.patch(mapped).source.model == "tiny_qwen2"
    assert ps.TargetPrompt(a, "about x").patch(src.at(layer=1)).source.model == "tiny_llama"


def test_cross_model_patching_through_fitted_maps_still_works():
    a, b = tiny("tiny_llama"), tiny("tiny_llama_wide")
    texts = ["The Eiffel Tower is in Paris, the capital of France."] * 4
    maps = ps.AffineMaps.fit_between(a, b, texts, [(1, 2)], max_positions=40)
    state = ps.capture(a, "The Eiffel Tower", layers=[1], positions=[-1]).at(layer=1)
    target = ps.TargetPrompt(b, "about x")
    as_tensor = target.patch(maps.apply(state, 1, 2), layer=2)
    as_state = target.patch(state.map(maps[1, 2], model=b), layer=2)
    assert torch.equal(as_tensor.vector, as_state.vector)
    assert len(ps.next_token(b, [as_tensor, as_state])) == 2


def test_an_attribute_subject_only_inside_another_word_is_dropped_and_counted(tmp_path):
    """The span finder is the placeholder's: "fish" is not the fish of "crayfish" (a real TSV row)."""
    from patchscan.experiments.attributes import AttributeExperiment
    from tests.experiments.test_tables import HEADER
    from tests.helpers import compose

    (tmp_path / "tsv").mkdir()
    (tmp_path / "tsv" / "animal_food.tsv").write_text(
        HEADER
        + "0\t0\tThe food of x\t-1\tb\tplankton\tfish\t prefers to eat crayfish\t4\t"
        + "[' prefers', ' to', ' eat', ' crayfish']\n"
        + "1\t1\tThe food of x\t-1\tb\tgrass\tcow\t a cow\t2\t[' a', ' cow']\n"
    )
    cfg = compose("experiment=attribute_extraction", "model=tiny_llama", "dataset=patchscopes_tsv",
                  f"dataset.tsv={tmp_path / 'tsv'}", "table.paper=null")  # fmt: skip
    scope = AttributeExperiment(cfg)
    scope.bind(tiny("tiny_llama"))
    examples = scope.examples()
    assert [e["subject"] for e in examples] == ["cow"]
    assert scope.dropped["samples whose subject is not a word of its own in their source text"] == 1
