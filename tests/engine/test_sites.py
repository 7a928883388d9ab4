"""Sites of a block (issue 28): captures and patches at attn_out, mlp_in, mlp_out and resid_mid
against plain hooks on the named Hugging Face module, written here without engine code, on every
tiny family; resid_post unchanged; the refusals."""

from __future__ import annotations

import pytest
import torch

import patchscan as ps
from patchscan.errors import UserError
from tests.conftest import FAMILY_ARCHS, tiny
from tests.reference import naive_generate, naive_logits, register, site_hook, site_module

SOURCE = "The Eiffel Tower is in Paris"
TARGET = "Syria: Country in the Middle East, x"


def _sites(view, sites=("attn_out", "mlp_in", "mlp_out", "resid_mid")):
    return [s for s in sites if site_module(view, 0, s) is not None]


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_captures_equal_a_hook_on_the_module(arch):
    view = tiny(arch)
    ids = view.encode(SOURCE)
    for site in _sites(view):
        states = ps.capture(view, SOURCE, layers=[0, view.n_blocks - 1], positions=[1, -1], site=site)
        assert states.site == site
        for layer in states.layers:
            for position in states.positions:
                store: dict = {}
                handle = register(site_module(view, layer, site), site, site_hook(site, position, None, store))
                with torch.no_grad():
                    view.model(input_ids=torch.tensor([ids]))
                handle.remove()
                assert torch.equal(states[layer, position], store["h"]), (arch, site, layer, position)


def _patches(view, site):
    """Patches at `site` of blocks 0 and 2, at the placeholder (the last token) and one before it,
    with the site's own states of the source prompt, amplified so that they change the output."""
    src = ps.capture(view, SOURCE, layers=[0, 2], positions=[-1], site=site)
    target = ps.TargetPrompt(view, TARGET, placeholder="x")
    patches = []
    for position in (target.position, target.position - 2):
        for layer in (0, 2):
            patches.append(target.patch(src.at(layer=layer).map(lambda v: 4 * v), layer=layer, position=position))
    return target, patches


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_patched_next_token_and_generation_equal_a_hook_on_the_module(arch):
    view = tiny(arch)
    for site in _sites(view, ("mlp_out", "resid_mid")):
        target, patches = _patches(view, site)
        assert {p.target_site for p in patches} == {site}
        result = ps.next_token(view, patches, top_k=1)
        generated = ps.generate(view, patches, max_new_tokens=5)
        for k, p in enumerate(patches):
            ref = naive_logits(view, p)
            assert result.token_ids[k] == int(ref.argmax()), (arch, site, k)
            assert result.logprobs[k] == pytest.approx(float(ref.log_softmax(-1).max()), abs=1e-4)
            assert generated.token_ids[k] == naive_generate(view, p, 5), (arch, site, k)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_resid_post_is_unchanged(arch):
    """The default site is the block's output, as before sites: equal to a hook on the block."""
    view = tiny(arch)
    src = ps.capture(view, SOURCE, layers=[1], positions=[-1])
    assert src.site == "resid_post"
    target = ps.TargetPrompt(view, TARGET, placeholder="x")
    patch = target.patch(src.at(layer=1), layer=1)
    explicit = target.patch(src.at(layer=1), layer=1, site="resid_post")
    assert patch.target_site == explicit.target_site == "resid_post"

    def hook(module, inputs, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, patch.target_position] = patch.vector
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = view.blocks[1].register_forward_hook(hook)
    with torch.no_grad():
        ref = view.model(input_ids=torch.tensor([target.token_ids])).logits[0, -1]
    handle.remove()
    got = ps.next_token(view, [patch, explicit], top_k=1)
    assert got.token_ids == [int(ref.argmax())] * 2
    assert got.logprobs[0] == got.logprobs[1]


def test_a_state_of_one_site_patches_another():
    view = tiny("tiny_llama")
    src = ps.capture(view, SOURCE, layers=[1], positions=[-1], site="mlp_out")
    target = ps.TargetPrompt(view, TARGET, placeholder="x")
    patch = target.patch(src.at(layer=1), site="resid_mid")
    assert (patch.source.site, patch.target_site) == ("mlp_out", "resid_mid")
    ref = naive_logits(view, patch)
    assert ps.next_token(view, [patch], top_k=1).token_ids == [int(ref.argmax())]


def test_unknown_and_missing_sites_are_refused():
    view = tiny("tiny_llama")
    with pytest.raises(UserError, match=r"unknown site 'mlp_output'; sites: resid_post, resid_mid, attn_out"):
        ps.capture(view, SOURCE, site="mlp_output")
    target = ps.TargetPrompt(view, TARGET, placeholder="x")
    with pytest.raises(UserError, match="unknown site 'mlp'"):
        target.patch(torch.zeros(view.width), layer=0, site="mlp")
    for arch, family in (("tiny_neox", "gpt_neox"), ("tiny_gptj", "gptj")):
        with pytest.raises(UserError, match=rf"site 'resid_mid' is not available on the '{family}' family: .*parallel"):
            ps.capture(tiny(arch), SOURCE, site="resid_mid")
    with pytest.raises(UserError, match="site 'mlp_out' is not available on the 'opt' family"):
        ps.capture(tiny("tiny_opt"), SOURCE, site="mlp_out")


def test_the_family_table_names_existing_modules_for_its_sites():
    """families.check (at load) fails in one line when a site's module is missing."""
    from patchscan.models.families import check

    view = tiny("tiny_llama")
    mlp = view.blocks[0].mlp
    try:
        del view.blocks[0].mlp
        with pytest.raises(UserError, match="a block has no"):
            check(view.model)
    finally:
        view.blocks[0].mlp = mlp


def test_a_cli_run_at_mlp_out_writes_its_sites(tmp_path):
    """`patchscope.target_site=mlp_out` reaches the patches and every row records both sites."""
    import pandas as pd

    from tests.helpers import cli

    run = tmp_path / "run"
    args = ["+experiment=next_token", "model=tiny_llama", "dataset.limit=2", "methods=[token_identity,logit_lens]"]
    cli("run", *args, "patchscope.target_site=mlp_out", f"hydra.run.dir={run}", cwd=tmp_path)
    df = pd.read_parquet(run / "results")
    assert {"source_site", "target_site"} <= set(df.columns)
    assert (df["source_site"] == "resid_post").all()
    ident, lens = df[df["method"] == "token_identity"], df[df["method"] == "logit_lens"]
    assert len(ident) and (ident["target_site"] == "mlp_out").all() and (lens["target_site"] == "resid_post").all()
    bad = cli(
        "run",
        *args,
        "patchscope.target_site=mlp_output",
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
        check=False,
    )
    assert "patchscope.target_site='mlp_output' is not valid; use one of resid_post, resid_mid" in bad.stderr


@pytest.mark.parametrize(("site", "skipped"), [("resid_post", 3), ("resid_mid", 2), ("mlp_out", 0), ("attn_out", 0)])
def test_next_token_skips_the_blocks_below_only_where_exact(site, skipped):
    """At the last position, blocks 0..ℓ* are skipped for resid_post, 0..ℓ*-1 for resid_mid, none
    for the others (counted as MLP calls on the one-token suffix), and the result is the hook's."""
    view = tiny("tiny_llama")
    target = ps.TargetPrompt(view, TARGET, placeholder="x")
    vector = 3 * torch.randn(view.width, generator=torch.Generator().manual_seed(1))
    patch = target.patch(vector, layer=2, site=site)
    calls = [0] * view.n_blocks

    def counter(b):
        def hook(module, args):
            calls[b] += args[0].shape[1] == 1  # the suffix, not the prefix's forward

        return hook

    handles = [block.mlp.register_forward_pre_hook(counter(b)) for b, block in enumerate(view.blocks)]
    try:
        got = ps.next_token(view, [patch], top_k=1)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0] * skipped + [1] * (view.n_blocks - skipped)
    if site != "resid_post":
        ref = naive_logits(view, patch)
        assert got.token_ids == [int(ref.argmax())]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_generation_logprobs_are_scored_at_the_patched_site(arch):
    """GenerationResult.logprobs (one scoring forward) hooks each patch at its own site: they equal a
    plain hook on the HF module over prompt + continuation."""
    view = tiny(arch)
    target = ps.TargetPrompt(view, TARGET)
    src = ps.capture(view, SOURCE, layers=[1], positions=[-1], site="mlp_out")
    patches = [target.patch(src.at(layer=1), site=site) for site in _sites(view, ("mlp_out", "resid_mid"))]
    patches.append(target.patch(src.at(layer=1), site="resid_post"))
    result = ps.generate(view, patches, max_new_tokens=3)
    for patch, tokens, scored in zip(patches, result.token_ids, result.logprobs):
        ids = list(target.token_ids) + tokens
        site, layer = patch.target_site, patch.target_layer
        hook = site_hook(site, target.position, patch.vector)
        handle = register(site_module(view, layer, site), site, hook)
        try:
            with torch.no_grad():
                logits = view.model(input_ids=torch.tensor([ids])).logits[0].float()
        finally:
            handle.remove()
        first = len(target.token_ids) - 1
        expected = torch.log_softmax(logits[first : first + len(tokens)], -1).gather(1, torch.tensor(tokens)[:, None])
        assert torch.allclose(torch.tensor(scored), expected.squeeze(1), atol=1e-4), (arch, site)


def test_the_built_in_model_reads_and_writes_sites_as_hooks_do(builtin_view):
    """SmolLM2-135M (issue 28's done-means): attn_out and mlp_out captures equal a hook on the HF
    module exactly (fp32); an amplified mlp_out patch gives the hook's next token and generation."""
    view = builtin_view
    ids = view.encode(SOURCE)
    for site in ("attn_out", "mlp_out"):
        states = ps.capture(view, SOURCE, layers=[1, view.n_blocks - 1], positions=[-1], site=site)
        for layer in states.layers:
            store: dict = {}
            handle = register(site_module(view, layer, site), site, site_hook(site, len(ids) - 1, None, store))
            with torch.no_grad():
                view.model(input_ids=torch.tensor([ids]))
            handle.remove()
            assert torch.equal(states[layer, -1], store["h"]), (site, layer)
    src = ps.capture(view, SOURCE, layers=[3], positions=[-1], site="mlp_out")
    target = ps.TargetPrompt(view, TARGET, placeholder="x")
    patch = target.patch(src.at(layer=3).map(lambda v: 6 * v), layer=3, site="mlp_out")
    assert ps.next_token(view, [patch], top_k=1).token_ids == [int(naive_logits(view, patch).argmax())]
    assert ps.generate(view, [patch], max_new_tokens=6).token_ids[0] == naive_generate(view, patch, 6)
