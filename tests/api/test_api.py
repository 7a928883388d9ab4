"""The public API (`import patchscan as ps`): strings in, result objects out, on real tiny models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import patchscan as ps
from patchscan.errors import UserError
from tests.conftest import registered_by_us, tiny
from tests.reference import naive_generate, naive_logits

IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
THREE_ARCHS = ["tiny_gpt2", "tiny_llama", "tiny_neox"]


def _plain_logits(lm, patch):
    """The naive method's logits; for a baseline, the plain model's."""
    if patch.vector is not None:
        return naive_logits(lm, patch)
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([patch.target_ids])).logits[0, -1].float()


def test_import_loads_neither_hydra_pandas_nor_matplotlib():
    code = (
        "import sys, patchscan as ps; ps.TargetPrompt; ps.next_token; "
        "print(sorted(m for m in ('hydra', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_issue_script_runs_on_the_builtin_model():
    lm = ps.load_model("smollm2_135m", device="cpu")
    src = ps.capture(lm, "The Eiffel Tower is located in the city of", layers=[10, 20], positions=[-1])
    target = ps.TargetPrompt(lm, IDENTITY, placeholder="?")
    frame = ps.next_token(lm, [target.patch(src.at(layer=20), layer=20)]).to_frame()
    assert frame.loc[0, "source_layer"] == 20 and frame.loc[0, "target_layer"] == 20
    assert frame.loc[0, "target_position"] == len(target.token_ids) - 1
    desc = ps.TargetPrompt(
        lm, "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x", placeholder="x"
    )
    text = ps.generate(lm, [desc.patch(src.at(layer=10), layer=10)], max_new_tokens=8).texts[0]
    assert isinstance(text, str) and text.strip()


def test_unknown_model_is_one_line_value_error():
    with pytest.raises(ValueError, match="unknown model 'no_such_model'") as info:
        ps.load_model("no_such_model")
    assert "\n" not in str(info.value) and isinstance(info.value, ps.UserError)
    with pytest.raises(ValueError, match="GGUF file not found"):
        ps.load_model("/nowhere/model.gguf")


def test_load_model_from_a_folder_gives_the_same_model(tmp_path):
    lm = tiny("tiny_llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    again = ps.load_model(str(tmp_path / "m"), device="cpu")
    assert again.name == "m"
    ids = torch.tensor([lm.encode("hello world")])
    assert torch.equal(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_wrap_runs_no_forward_and_changes_nothing():
    tiny_lm = ps.load_model("tiny_gpt2", device="cpu")
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    model.train()
    pad = tokenizer.pad_token
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    lm = ps.ModelView.wrap(model, tokenizer)
    handle.remove()
    assert calls == [] and model.training and tokenizer.pad_token == pad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    assert lm.n_blocks == 4 and lm.block_returns_tuple in (True, False)


def test_patch_is_keyword_only_and_baseline_is_explicit():
    with pytest.raises(TypeError):
        ps.Patch((1, 2), 1, 0, None)  # positional: a block could pass for a position
    lm = tiny("tiny_llama")
    target = ps.TargetPrompt(lm, IDENTITY, placeholder="?")
    base = target.baseline()
    assert base.is_baseline and base.target_position == target.position
    with pytest.raises(ValueError, match="must be a State or a tensor, not list"):
        target.patch([1.0, 2.0], layer=1)


@pytest.mark.parametrize("name", THREE_ARCHS)
def test_capture_by_text_equals_capture_by_ids(name):
    lm = tiny(name)
    texts = ["The Eiffel Tower is in Paris", "Hello"]
    many = ps.capture(lm, texts, layers=[0, -1], positions=[0, -1])
    for text, states in zip(texts, many):
        ids = lm.encode(text)
        one = ps.engine.capture(lm, [ids], [0, lm.n_blocks - 1], [[0, len(ids) - 1]])[0]
        assert states.positions == [0, len(ids) - 1]
        alone = one.at(lm.n_blocks - 1, 1)
        # fp32 rounding of a padded batch vs one prompt, relative to the state's scale (a padding bug is O(1)):
        # on a CPU with AMX the batched kernels differ by about 7 ulp of the largest entry
        assert torch.allclose(states[-1, -1], alone, rtol=0, atol=1e-5 * float(alone.abs().max()))
        assert torch.equal(states.at(layer=lm.n_blocks - 1, position=len(ids) - 1).vector, states[-1, -1])
    with pytest.raises(ValueError, match="was not captured"):
        many[0].at(layer=1, position=0)


@pytest.mark.parametrize("name", THREE_ARCHS)
def test_next_token_equals_the_naive_method(name):
    lm = tiny(name)
    target = ps.TargetPrompt(lm, IDENTITY, placeholder="?")
    src = ps.capture(lm, "Paris is the capital of", layers=[0, 2], positions=[-1])
    patches = target.grid(src, target_layers="all") + [target.baseline()]
    result = ps.next_token(lm, patches, top_k=3, batch_size=3)
    for k, patch in enumerate(patches):
        reference = torch.log_softmax(_plain_logits(lm, patch), -1)
        assert result.token_ids[k] == int(reference.argmax())
        assert result.logprobs[k] == pytest.approx(float(reference.max()), abs=1e-4)
    frame = result.to_frame()
    assert frame["patched"].tolist() == [True] * 8 + [False]
    assert frame["source_layer"].tolist()[:5] == [0, 0, 0, 0, 2]
    assert frame["target_layer"].isna().tolist() == [False] * 8 + [True]


@pytest.mark.parametrize("name", THREE_ARCHS)
def test_generate_equals_naive_and_its_logprobs_are_greedy(name):
    lm = tiny(name)
    desc = ps.TargetPrompt(lm, "Syria: Country in the Middle East, x", placeholder="x")
    src = ps.capture(lm, "Diana, Princess of Wales", layers=[1, 3], positions=[-1])
    patches = desc.grid(src) + [desc.baseline()]
    result = ps.generate(lm, patches, max_new_tokens=5)
    first = ps.next_token(lm, patches, top_k=1)
    for k, patch in enumerate(patches):
        assert result.token_ids[k] == naive_generate(lm, patch, max_new_tokens=5)
        # the first generated token's log-prob, by a plain forward, equals the engine's top-1
        assert result.logprobs[k][0] == pytest.approx(first.logprobs[k], abs=1e-4)
    frame = result.to_frame()
    assert frame["generation"].tolist() == result.texts
    assert (frame["logprob"] <= 0).all()


def test_grid_rejects_an_unknown_target_spec():
    lm = tiny("tiny_llama")
    src = ps.capture(lm, "Paris", layers=[0], positions=[-1])
    with pytest.raises(ValueError, match="target_layers='every'"):
        ps.TargetPrompt(lm, "x").grid(src, target_layers="every")
    with pytest.raises(ValueError, match="no patches"):
        ps.next_token(lm, [])


def test_named_target_prompts_come_from_the_patchscope_configs():
    lm = tiny("tiny_llama")
    assert ps.TargetPrompt.named(lm, "token_identity").text == IDENTITY
    assert ps.TargetPrompt.named(lm, "entity_description").placeholder == "x"
    with pytest.raises(ValueError, match="'nope'"):
        ps.TargetPrompt.named(lm, "nope")


@pytest.mark.parametrize("name", THREE_ARCHS)
def test_overwrite_around_hf_generate_equals_batched_generate(name):
    lm = tiny(name)
    desc = ps.TargetPrompt(lm, "Syria: Country in the Middle East, x", placeholder="x")
    state = ps.capture(lm, "Diana, Princess of Wales", layers=[2], positions=[-1]).at(layer=2)
    ids = torch.tensor([desc.token_ids])
    with ps.overwrite(lm, layer=2, position=desc.position, vector=state):
        out = lm.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    expected = ps.generate(lm, [desc.patch(state, layer=2)], max_new_tokens=5).token_ids[0]
    assert out[0, ids.shape[1] :].tolist()[: len(expected)] == expected
    assert all(not registered_by_us(hook) for block in lm.blocks for hook in block._forward_hooks.values())


def test_overwrite_rejects_a_vector_of_another_width():
    lm = tiny("tiny_llama")
    with pytest.raises(ValueError, match="width 3"):
        with ps.overwrite(lm, {(1, -1): torch.zeros(3)}):
            pass


def test_affine_lens_fit_save_load_and_cache(tmp_path):
    from patchscan.data.texts import load_texts

    lm = tiny("tiny_llama")
    texts = load_texts({"kind": "builtin", "name": "texts"})[:40]
    lens = ps.AffineLens.fit(lm, texts, layers=[1, 3])
    again = ps.AffineLens.fit(lm, texts, layers=[1, 3])  # from the cache
    assert torch.equal(lens.maps[1].weight, again.maps[1].weight)
    lens.save(tmp_path)
    loaded = ps.AffineLens.load(lm, tmp_path)
    assert loaded.layers == [1, 3]
    src = ps.capture(lm, texts[0], layers=[1, 3], positions=[-1])
    assert torch.allclose(loaded(src.at(layer=1)), lens(src.at(layer=1)))
    # block 3 is the last: its fitted map is the identity, so the affine lens is the logit lens there
    assert torch.allclose(lens(src.at(layer=3)), ps.LogitLens(lm)(src.at(layer=3)), atol=1e-3)
    with pytest.raises(ValueError, match="no map for block 2"):
        lens(src.at(layer=3).vector, layer=2)


def test_readme_python_api_script_runs_as_written(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(script, "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out
    assert "source_layer" in out and "generation" in out and "29:" in out


def test_a_wrapped_model_without_a_pad_token_gives_what_a_loaded_one_gives():
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from patchscan.models.loading import builtin_folder

    loaded = tiny("tiny_neox")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(builtin_folder())
    tokenizer.pad_token = None
    hf_model = AutoModelForCausalLM.from_config(loaded.model.config).eval()
    hf_model.load_state_dict(loaded.model.state_dict())
    lm = ps.ModelView.wrap(hf_model, tokenizer)
    outs = []
    for view in (lm, loaded):
        target = ps.TargetPrompt(view, IDENTITY, placeholder="?")
        src = ps.capture(view, ["Paris", "The Eiffel Tower"], layers=[1], positions=[-1])
        patches = [target.patch(s.at(layer=1)) for s in src] + [target.baseline()]
        outs.append((ps.next_token(view, patches).token_ids, ps.generate(view, patches, max_new_tokens=3).token_ids))
    assert outs[0] == outs[1] and tokenizer.pad_token is None


def test_bad_input_names_the_bad_value():
    lm = tiny("tiny_llama")
    cases = [
        (lambda: ps.capture(lm, "Paris", layers=[9]), "layer 9 is out of range"),
        (lambda: ps.capture(lm, "Paris", positions=[7]), "position 7 is out of range"),
        (lambda: ps.TargetPrompt(lm, "no marker here", placeholder="?"), "does not contain the placeholder '?'"),
        (lambda: ps.TargetPrompt(lm, "x").patch(torch.zeros(lm.width)), "pass layer="),
        (lambda: ps.capture(lm, "Paris is big").at(layer=1), "several positions were captured"),
    ]
    for call, message in cases:
        with pytest.raises(ps.UserError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", THREE_ARCHS)
def test_edit_blocks_callback_equals_overwrite(name):
    lm = tiny(name)
    ids = torch.tensor([lm.encode("The Eiffel Tower is in Paris")])
    vector = torch.randn(lm.width)

    def put(hidden, layer):
        hidden = hidden.clone()
        hidden[:, -1] = vector
        return hidden

    with torch.no_grad():
        with ps.edit_blocks(lm, put, layers=[1]):
            edited = lm.model(input_ids=ids).logits
        with ps.overwrite(lm, layer=1, position=-1, vector=vector):
            overwritten = lm.model(input_ids=ids).logits
    assert torch.allclose(edited, overwritten)
    assert all(not registered_by_us(hook) for block in lm.blocks for hook in block._forward_hooks.values())


def test_overwrite_and_edit_blocks_at_a_site_equal_a_hook_on_the_module():
    """`site=` in the escape hatch: mlp_out as a forward hook on the MLP would write it, resid_mid
    as the residual between attention and MLP (the MLP's input and the block's sum both see it)."""
    lm = tiny("tiny_llama")
    ids = torch.tensor([lm.encode("The Eiffel Tower is in")])
    vector = 3 * torch.randn(lm.width, generator=torch.Generator().manual_seed(0))

    def mlp_hook(module, inputs, output):
        output = output.clone()
        output[:, -1] = vector
        return output

    def mid_hook(module, args):
        args[0][:, 2] = 0.5 * args[0][:, 2]

    with torch.no_grad():
        handle = lm.blocks[1].mlp.register_forward_hook(mlp_hook)
        ref_mlp = lm.model(input_ids=ids).logits
        handle.remove()
        handle = lm.blocks[2].post_attention_layernorm.register_forward_pre_hook(mid_hook)
        ref_mid = lm.model(input_ids=ids).logits
        handle.remove()
        with ps.overwrite(lm, layer=1, position=-1, vector=vector, site="mlp_out"):
            got_mlp = lm.model(input_ids=ids).logits

        def halve(hidden, layer):
            hidden = hidden.clone()
            hidden[:, 2] = 0.5 * hidden[:, 2]
            return hidden

        with ps.edit_blocks(lm, halve, layers=[2], site="resid_mid"):
            got_mid = lm.model(input_ids=ids).logits
        plain = lm.model(input_ids=ids).logits
    assert torch.equal(got_mlp, ref_mlp) and not torch.equal(got_mlp, plain)
    assert torch.equal(got_mid, ref_mid) and not torch.equal(got_mid, plain)
    with pytest.raises(UserError, match="site 'resid_mid' is not available on the 'gptj' family"):
        with ps.overwrite(tiny("tiny_gptj"), layer=0, position=-1, vector=torch.zeros(64), site="resid_mid"):
            pass


def test_overwrite_at_a_site_in_generate_equals_the_engine():
    """The escape hatch at mlp_out under HF generate (prefill only) gives what ps.generate gives."""
    lm = tiny("tiny_llama")
    target = ps.TargetPrompt(lm, "Syria: Country in the Middle East, x", placeholder="x")
    src = ps.capture(lm, "Diana, Princess of Wales", layers=[1], positions=[-1], site="mlp_out")
    patch = target.patch(src.at(layer=1).map(lambda v: 4 * v))
    assert patch.target_site == "mlp_out"
    engine_tokens = ps.generate(lm, [patch], max_new_tokens=6).token_ids[0]
    ids = torch.tensor([target.token_ids])
    with torch.no_grad(), ps.overwrite(lm, layer=1, position=target.position, vector=patch.vector, site="mlp_out"):
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
            eos_token_id=sorted(lm.eos_token_ids) or None,
        )
    assert out[0, ids.shape[1] :].tolist() == engine_tokens
    frame = ps.generate(lm, [patch, target.baseline()], max_new_tokens=2).to_frame()
    assert frame["source_site"].tolist()[0] == "mlp_out" and frame["target_site"].tolist()[0] == "mlp_out"
