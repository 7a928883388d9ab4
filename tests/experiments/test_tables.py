"""Table 2's aggregations on hand-built rows, the Patchscopes TSV loader, and the controls end to end
on a tiny model (in-process: the scope's own run_chunk, metrics and report)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import ttest_rel

from patchscan.data.patchscopes_tsv import cropped_source, tsv_samples
from patchscan.engine import Patch, capture, patched_next_token
from patchscan.metrics.stats import any_target_block, bonferroni, over_blocks, paired_ttest, significance_mark
from patchscan.metrics.table2 import attribute_table, format_table
from tests.conftest import tiny
from tests.helpers import compose
from tests.reference import naive_generate

HEADER = (
    "\tsample_id\tprompt_target\tposition_target\ttarget_baseline\tobject\tsubject\tprompt_source\t"
    "position_source\tsource_cropped_toks\n"
)


def grid_rows(task: str, correct: dict, method: str = "patchscope") -> list[dict]:
    """Rows of one method: correct[(example, source block)] = list of per-ℓ* outcomes."""
    return [
        {"relation": task, "example_id": f"{task}/{e}", "method": method, "source_layer": s, "target_layer": t,
         "object": f"o{e % 2}", "correct": c}
        for (e, s), outcomes in correct.items()
        for t, c in enumerate(outcomes)
    ]  # fmt: skip


def test_any_target_block_and_mean_std_over_blocks():
    rows = pd.DataFrame(
        grid_rows("r", {(0, 0): [False, True], (1, 0): [False, False], (0, 3): [True, True], (1, 3): [True, False]})
    )
    scored = any_target_block(rows, ["example_id", "source_layer"])
    assert scored["correct"].tolist() == [True, True, False, True]  # any ℓ*, per (sample, ℓ)
    per_block = scored.groupby("source_layer")["correct"].mean()  # ℓ=0: 0.5, ℓ=3: 1.0
    stats = over_blocks(per_block)
    assert stats["mean"] == 0.75 and stats["std"] == 0.25  # population std over blocks, not the best block
    assert stats["best"] == 1.0 and stats["best_block"] == 3 and stats["blocks"] == 2


def test_paired_ttest_bonferroni_and_stars():
    a = pd.Series([0.5, 0.6, 0.8, 0.9], index=[0, 3, 6, 9])
    b = pd.Series([0.1, 0.3, 0.2, 0.4, 0.7], index=[0, 3, 6, 9, 12])  # block 12 has no pair: left out
    t, p = paired_ttest(a, b)
    expected = ttest_rel([0.5, 0.6, 0.8, 0.9], [0.1, 0.3, 0.2, 0.4])
    assert t == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue) and t > 0
    assert all(math.isnan(v) for v in paired_ttest(a, a + 0.1))  # constant differences: no test
    assert bonferroni(0.01, 12) == pytest.approx(0.12) and bonferroni(0.2, 12) == 1.0
    assert math.isnan(bonferroni(math.nan, 12))
    stars = {"**": 1e-5, "*": 1e-4}
    assert significance_mark(3.0, 5e-5, ("patchscope", "probe"), stars) == "patchscope*"
    assert significance_mark(-3.0, 5e-6, ("patchscope", "probe"), stars) == "probe**"
    assert significance_mark(3.0, 0.01, ("patchscope", "probe"), stars) == ""


def test_attribute_table_on_hand_built_rows():
    good = {(e, s): [s >= 3 and e < 3, False] for e in range(4) for s in (0, 3, 6)}  # 0, .75, .75 over ℓ
    weak = {(e, s): [e == 0] for e in range(4) for s in (0, 3, 6)}  # .25 at every ℓ
    df = pd.DataFrame(
        grid_rows("a", good)
        + grid_rows("a", {(e, s): [e == 1] for e in range(4) for s in (0, 3, 6)}, "shuffled_source")
        + grid_rows("a", {(e, None): [False, e < 1] for e in range(4)}, "embedding_only")
        + grid_rows("a", {(e, None): [e == 0] for e in range(6)}, "subject_in_prompt")  # 2 samples filtered out
        + grid_rows("b", weak)
        + grid_rows("b", {(e, s): [True] for e in range(4) for s in (0, 3, 6)}, "shuffled_source")
    )
    probe = pd.DataFrame(
        [{"relation": r, "example_id": f"{r}/{e}", "source_layer": s, "correct": e < k}
         for r, k in (("a", 1), ("b", 1)) for e in range(4) for s, k in ((0, k), (3, k + 1), (6, k))]
    )  # fmt: skip
    paper = pd.DataFrame(
        [{"lre_relation": "a", "probe_mean": 10.0, "probe_std": 1.0, "patchscope_mean": 50.0, "patchscope_std": 5.0,
          "significant": "patchscope**", "n": 40}]
    ).set_index("lre_relation")  # fmt: skip
    tasks = {t["task"]: t for t in attribute_table(df, probe, paper, {"**": 1e-5, "*": 1e-4})}
    a, b = tasks["a"], tasks["b"]
    assert a["n"] == 4 and a["n_samples"] == 6 and a["classes"] == 2
    assert a["patchscope_mean"] == pytest.approx(0.5) and a["patchscope_std"] == pytest.approx(math.sqrt(0.125))
    assert a["patchscope_best"] == 0.75 and a["patchscope_best_block"] == 3
    assert a["probe_mean"] == pytest.approx(1 / 3) and a["shuffled_source_mean"] == 0.25
    assert a["embedding_only"] == 0.25 and a["subject_in_prompt"] == pytest.approx(1 / 6)
    assert math.isnan(a["prompt_only"]) and a["beats_controls"]  # 0.5 > shuffled 0.25 and > embedding_only 0.25
    t, p = paired_ttest(pd.Series([0.0, 0.75, 0.75], [0, 3, 6]), pd.Series([0.25, 0.5, 0.25], [0, 3, 6]))
    assert a["t"] == pytest.approx(t) and a["p_bonferroni"] == pytest.approx(min(1.0, 2 * p))  # 2 tasks
    assert a["paper_patchscope_mean"] == 50.0 and a["paper_n"] == 40 and b["paper_probe_mean"] is None
    assert b["patchscope_mean"] == 0.25 and b["shuffled_source_mean"] == 1.0 and not b["beats_controls"]
    text = format_table(list(tasks.values()))
    assert "50.0 ± 5.0" in text and "25.0 ± 0.0" in text and text.rstrip().endswith("!")


def test_tsv_loader_crops_at_the_marked_subject_and_keeps_repeated_samples(tmp_path):
    row = {"prompt_source": " Pizza Hut and Pizza Express sell Pizza", "subject": "Pizza",
           "source_cropped_toks": "[' Pizza', ' Hut', ' and', ' Pizza']"}  # fmt: skip
    assert cropped_source(row) == " Pizza Hut and Pizza"  # the occurrence the GPT-J tokens end at
    assert cropped_source({**row, "source_cropped_toks": "[' Pizza']"}) == " Pizza"
    assert cropped_source({**row, "prompt_source": ""}) is None
    (tmp_path / "factual").mkdir()
    (tmp_path / "factual" / "food_from_country.tsv").write_text(
        HEADER + "0\t0\tThe country of origin for x\t-1\tb\tItaly\tPizza\t after moving into Pizza Hut\t3\t"
        "[' after', ' moving', ' into', ' Pizza']\n"
        "1\t0\tThe country of origin for x\t-1\tb\tItaly\tPizza\t campaigns by Pizza\t2\t"
        "[' campaigns', ' by', ' Pizza']\n"
        "2\t0\tThe country of origin for x\t-1\tb\tItaly\tPizza\t\t0\t[]\n"
        "3\t1\tThe country of origin for x\t-1\tb\tJapan\tSushi\t Jon of Sushi fame\t2\t[' Jon', ' of', ' Sushi']\n"
    )
    samples = tsv_samples(tmp_path, None, None, "drop")
    assert [s["source_prompt"] for s in samples] == [" after moving into Pizza", " campaigns by Pizza", " Jon of Sushi"]
    assert [s["sample_id"] for s in samples] == ["food_from_country/0"] * 2 + ["food_from_country/1"]
    two = tsv_samples(tmp_path, ["food_from_country"], 2, "drop")  # one window of each subject in turn
    assert [s["subject"] for s in two] == ["Pizza", "Sushi"]
    assert len(tsv_samples(tmp_path, None, None, "subject")) == 4


def test_real_tsv_files_load_when_present():
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "patchscopes_tsv"
    root = root if root.is_dir() else Path("/work/shared/data/patchscopes_tsv")
    if not root.is_dir():
        pytest.skip("the Patchscopes TSVs are not beside this checkout")
    samples = tsv_samples(root, ["food_from_country"], None, "drop")
    assert len(samples) == 51 and len({s["sample_id"] for s in samples}) < len(samples)  # repeated sample ids
    assert all(s["source_prompt"].endswith(s["subject"]) for s in samples)


def control_run(tmp_path):
    """tiny_llama, two relations of a written TSV, source blocks 1 and 3, target blocks 0 and 2."""
    (tmp_path / "tsv").mkdir(exist_ok=True)
    (tmp_path / "tsv" / "country_capital_city.tsv").write_text(
        HEADER
        + "".join(
            f"{i}\t{i}\tThe capital city of x\t-1\tb\t{o}\t{s}\t trains from {s}\t2\t[' trains', ' from', ' {s}']\n"
            for i, (s, o) in enumerate([("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")])
        )
    )
    (tmp_path / "tsv" / "fruit_inside_color.tsv").write_text(
        HEADER
        + "0\t0\tThe color of the inside of x\t-1\tb\twhite\tbanana\t ate a banana\t2\t[' ate', ' a', ' banana']\n"
    )
    cfg = compose(
        "experiment=attribute_extraction",
        "model=tiny_llama",
        "dataset=patchscopes_tsv",
        f"dataset.tsv={tmp_path / 'tsv'}",
        "sweep.source_layers=[1,3]",
        "sweep.target_layers=[0,2]",
        "generation.max_new_tokens=4",
        "table.paper=null",
        "controls=[prompt_only,embedding_only,shuffled_source,source_in_prompt,zero,mean]",
    )
    from patchscan.experiments.attributes import AttributeExperiment

    scope, view = AttributeExperiment(cfg), tiny("tiny_llama")
    scope.bind(view)
    examples = scope.examples()
    return cfg, scope, view, examples, scope.run_chunk(examples, lambda n: None)


def test_controls_are_computed_as_defined(tmp_path):
    cfg, scope, view, examples, df = control_run(tmp_path)
    methods = df.groupby("method").size().to_dict()
    assert methods == {
        "patchscope": 16,
        "shuffled_source": 12,
        "embedding_only": 8,
        "prompt_only": 4,
        "subject_in_prompt": 4,
        "source_state": 8,
        "source_in_prompt": 4,
        "zero": 16,
        "mean": 16,
    }  # fmt: skip  (banana has no donor)
    po = df[df["method"] == "prompt_only"].iloc[0]  # the target prompt, placeholder as is, unpatched
    plain = Patch(target_ids=tuple(po.target_token_ids), target_position=-1, target_layer=0, vector=None)
    assert po.target_prompt == "The capital city of x" and view.decode(naive_generate(view, plain, 4)) == po.generation
    emb = df[df["method"] == "embedding_only"].iloc[1]  # the subject's last-token input embedding at ℓ*
    token = int(emb.source_token_ids[int(emb.source_position)])
    vector = view.embed(torch.tensor([[token]]))[0, 0]
    patch = Patch(target_ids=tuple(emb.target_token_ids), target_position=int(emb.target_position),
                  target_layer=int(emb.target_layer), vector=vector)  # fmt: skip
    assert pd.isna(emb.source_layer) and view.decode(naive_generate(view, patch, 4)) == emb.generation
    sh = df[df["method"] == "shuffled_source"]
    assert (sh["source_subject"] != sh["subject"]).all() and set(sh["relation"]) == {"country_capital_city"}

    row = sh.iloc[3]  # another sample's subject state (same relation), scored against this sample's object
    state = capture(view, [list(row.source_token_ids)], [int(row.source_layer)], [[int(row.source_position)]])
    patch = Patch(target_ids=tuple(row.target_token_ids), target_position=int(row.target_position),
                  target_layer=int(row.target_layer), vector=state[0].states[0, 0])  # fmt: skip
    assert view.decode(naive_generate(view, patch, 4)) == row.generation and row.source_text.endswith(
        row.source_subject
    )
    check_shared_controls(view, examples, df)
    # a chunk of one example (as a shard or a resume may run it) patches the mean over ALL examples
    check_shared_controls(view, examples, scope.run_chunk(examples[:1], lambda n: None))
    metrics = scope.metrics(df, cfg)
    task = {t["task"]: t for t in metrics["tasks"]}["country_capital_city"]
    for key in ("patchscope_mean", "patchscope_std", "probe_mean", "t", "p_bonferroni", "embedding_only",
                "shuffled_source_mean", "prompt_only", "subject_in_prompt", "paper_patchscope_mean",
                "zero_mean", "mean_mean", "source_in_prompt"):  # fmt: skip
        assert key in task
    assert task["gain"] == pytest.approx(task["patchscope_mean"] - task["source_in_prompt"])
    report = scope.report(metrics)
    header = report.splitlines()[1]
    for column in ("probe", "patchscope", "p_bonf", "paper_patchscope", "embedding_only", "shuffled_source",
                   "zero", "mean", "source_in_prompt", "gain"):  # fmt: skip
        assert column in header
    assert {c["method"] for c in metrics["by_layer"]} >= {"patchscope", "shuffled_source"}


def block_outputs(view, ids: list[int], layer: int) -> torch.Tensor:
    """A plain forward hook on block `layer`: its output at every position of one prompt."""
    seen = []

    def hook(module, inputs, output):
        seen.append((output[0] if isinstance(output, tuple) else output)[0].detach().clone())

    handle = view.blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            view.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0]


def check_shared_controls(view, examples, df):
    """source_in_prompt = a plain HF greedy continuation of "<source text>\n<prompt without x>";
    a zero row = a plain hook writing zeros; a mean row = the mean of every example's state (a plain
    capture of each), patched by a plain hook."""
    sip = df[df["method"] == "source_in_prompt"].iloc[0]
    text = sip.source_text.strip() + "\n" + "The capital city of"  # the documented prompt, built by hand
    assert sip.target_prompt == text
    x = view.tokenizer(text, return_tensors="pt").input_ids
    out = view.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                              pad_token_id=view.tokenizer.pad_token_id)  # fmt: skip
    assert view.tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True) == sip.generation
    mean = torch.stack([block_outputs(view, e["ids"], 3)[e["position"]] for e in examples]).mean(0)
    for method in ("zero", "mean"):
        row = df[(df["method"] == method) & (df["source_layer"] == 3)].iloc[0]
        vector = torch.zeros(view.width) if method == "zero" else mean
        patch = Patch(target_ids=tuple(row.target_token_ids), target_position=int(row.target_position),
                      target_layer=int(row.target_layer), vector=vector)  # fmt: skip
        assert view.decode(naive_generate(view, patch, 4)) == row.generation, method
        assert row.source_layer == 3 and row.target_prompt == "The capital city of x"


def test_placeholder_text_and_scale_change_the_patch(tmp_path):
    cfg = compose(
        "experiment=attribute_extraction",
        "model=tiny_gpt2",
        f"dataset.path={Path(__file__).parents[1] / 'fixtures' / 'lre'}",
        "dataset.relations=[country_capital_city]",
        "patchscope.placeholder_text='x x x'",
    )
    from patchscan.experiments.attributes import AttributeExperiment, placeholder_text

    scope, view = AttributeExperiment(cfg), tiny("tiny_gpt2")
    scope.bind(view)
    prompt, ids, pos = next(iter(scope.targets.values()))
    assert prompt.endswith("x x x") and pos == len(ids) - 1 and view.decode([ids[pos]]).strip() == "x"
    word = placeholder_text(view, "random", 0)
    assert word == placeholder_text(view, "random", 0) and len(view.encode(" " + word)) == 1
    assert scope.scale(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
    scaled = AttributeExperiment(compose("experiment=attribute_extraction", "patchscope.scale=2.5",
                                    f"dataset.path={Path(__file__).parents[1] / 'fixtures' / 'lre'}"))  # fmt: skip
    assert scaled.scale(torch.ones(2)).tolist() == [2.5, 2.5]


def test_multihop_fix_rates_and_paper_numbers(tmp_path):
    from patchscan.experiments.multihop import MultihopExperiment

    def rows(example, method, correct, s=None, t=None):
        return {"relation": "a -> b", "example_id": example, "method": method, "correct": correct,
                "source_layer": s, "target_layer": t}  # fmt: skip

    df = pd.DataFrame(
        [rows("e1", "vanilla", False), rows("e2", "vanilla", False), rows("e3", "vanilla", True)]
        + [rows("e1", "cot", True), rows("e2", "cot", False), rows("e3", "cot", False)]
        + [rows("e1", "patchscope_cot", c, 1, t) for t, c in enumerate([False, True])]
        + [rows(e, "patchscope_cot", False, 1, 0) for e in ("e2", "e3")]
    )
    table8 = tmp_path / "t8.csv"
    table8.write_text("hop1_relation,hop2_relation,samples\na,b,7\n")
    cfg = OmegaConf.create(
        {"multihop": {"paper": {"vanilla": 19.57, "patchscope_cot": 50.0}, "paper_table8": str(table8)}}
    )
    metrics = MultihopExperiment.metrics(df, cfg)
    overall = metrics["overall"]
    assert overall["vanilla"] == pytest.approx(1 / 3) and overall["cot"] == pytest.approx(1 / 3)
    assert overall["patchscope_cot"] == pytest.approx(1 / 3) and overall["patchscope_cot_fixes"] == 0.5
    assert metrics["pairs"][0]["paper_samples"] == 7
    report = MultihopExperiment.report(metrics)
    assert "vanilla 19.57 vs 33.33" in report and "patchscope_cot 50.00 vs 33.33" in report


def test_multihop_cot_patchscope_patches_pi1_alone_into_pi2_alone(tmp_path):
    from patchscan.experiments.multihop import MultihopExperiment

    cfg = compose(
        "experiment=multihop",
        "model=tiny_llama",
        f"dataset.path={Path(__file__).parents[1] / 'fixtures' / 'lre'}",
        "dataset.relations=[city_in_country,country_capital_city]",
        "multihop.require_single_hops=false",
        "multihop.per_pair_limit=1",
        "multihop.directions=[cot]",
        "multihop.backpatch=false",
        "sweep.source_layers=[1]",
        "sweep.target_layers=[2]",
        "generation.max_new_tokens=4",
    )
    scope, view = MultihopExperiment(cfg), tiny("tiny_llama")
    scope.bind(view)
    df = scope.run_chunk(scope.examples()[:1], lambda n: None)
    row = df[df["method"] == "patchscope_cot"].iloc[0]
    assert row.source_text == "the country where " + row.subject + " is located"
    assert row.target_prompt == "The capital city of" and list(row.source_token_ids) == view.encode(row.source_text)
    state = capture(view, [list(row.source_token_ids)], [1], [[int(row.source_position)]])
    patch = Patch(
        target_ids=tuple(row.target_token_ids), target_position=-1, target_layer=2, vector=state[0].states[0, 0]
    )
    assert view.decode(naive_generate(view, patch, 4)) == row.generation
    assert np.array_equal(row.target_token_ids, view.encode("The capital city of"))


def test_single_token_prompt_ablation_keeps_the_token_at_its_source_position():
    from patchscan.experiments.next_token import NextTokenExperiment

    cfg = compose(
        "experiment=next_token",
        "model=tiny_llama",
        "dataset.limit=2",
        "methods=[token_identity]",
        "patchscope.single_token_prompt=true",
        "sweep.source_layers=[2]",
    )
    scope, view = NextTokenExperiment(cfg), tiny("tiny_llama")
    scope.bind(view)
    df = scope.run_chunk(scope.examples(), lambda n: None)
    pad = view.tokenizer.pad_token_id
    for _, row in df.iterrows():
        ids, pos = list(row.target_token_ids), int(row.source_position)
        assert int(row.target_position) == pos and ids == [pad] * pos + [int(row.source_token_ids[pos])]
        state = capture(view, [list(row.source_token_ids)], [2], [[pos]])
        patch = Patch(target_ids=tuple(ids), target_position=pos, target_layer=2, vector=state[0].states[0, 0])
        assert int(patched_next_token(view, [patch], top_k=1).ids[0, 0]) == int(row.pred_token_id)
