"""Multi-hop self-correction (paper §5) and back-patching (Biran et al. 2024).

A two-hop query composes two LRE relations whose hop-1 object is the hop-2 subject
("The capital city of the country where Lyon is located is"). Methods, all in one rows table:
- vanilla / cot: greedy answers to the composed question (cot adds "Let's think step by step.");
- patchscope (the paper's text): the hop-1 phrase's last-token state at block ℓ, patched at the
  last position of the hop-2 prompt ("The capital city of x") at block ℓ*;
- patchscope_code (the released code's direction): the last state of the hop-2 prompt, patched at
  the end of the hop-1 phrase, generating from there;
- patchscope_cot (the paper's CoT Patchscope configuration, §5 and appendix F): source = the hop-1
  phrase π1 alone, i = its last token; target = the question's text before π1 (π2, "The capital
  city of") alone, i* = its last token; equivalent to one query [π2][π1] with the two parts masked
  from each other. Pairs whose question does not start with text before π1 get no such rows;
- backpatch: the question's last-position state at block ℓ patched back into block ℓ* < ℓ.
A sample is corrected by a method when its answer appears for some (ℓ, ℓ*).
`controls` (experiments.controls): `zero` / `mean` rows null every grid method's vector (`null_of`
names the method; the mean is over all candidates' states at that method's source position), and
one `source_in_prompt` row per sample built from the first of `multihop.directions`: paper = the
question up to the end of π1, then the hop-2 prompt without its placeholder; code = the hop-2
prompt's text before the placeholder, then π1; cot = π1, then the question's text before π1.
With `multihop.require_single_hops`, each chunk first asks both single hops (`hop1` / `hop2` rows,
for every candidate, so a resume knows filtered samples are done); the methods run only for
samples the model answers hop by hop. `dataset.limit` counts candidates, before that filter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from patchscan.data.lre import load_relations
from patchscan.engine import Patch
from patchscan.errors import UserError
from patchscan.experiments import controls
from patchscan.experiments.base import Experiment
from patchscan.experiments.prompts import find_word, placeholder_position, span_last_token
from patchscan.grids import layer_pairs
from patchscan.metrics.answers import StopWhenFound
from patchscan.metrics.text import contains_answer

log = logging.getLogger(__name__)
GRID_METHODS = ("patchscope", "patchscope_code", "patchscope_cot", "backpatch")
DIRECTIONS = ("paper", "code", "cot")
HOP_METHODS = ("hop1", "hop2")  # the single-hop filter's answers, for every candidate sample
# where each grid method reads its source state (the `mean` control averages states of that kind)
SOURCE_KINDS = {
    "patchscope": "phrase_in_question",
    "patchscope_code": "head",
    "patchscope_cot": "phrase",
    "backpatch": "question",
}


class _Work:
    """Runs for the engine (`patches`) and, in the same order, what each result row needs (`cells`)."""

    def __init__(self, site: str):
        self.site = site  # the target site of every patched run
        self.patches: list[Patch] = []
        self.cells: list[tuple] = []
        self.null_of: list[str] = []  # the grid method a `zero` / `mean` row nulls ("" for the others)

    def add(self, e, method, s, t, target_ids, position, vector, source_ids, source_position, source_text, prompt):
        self.null_of.append("")
        self.patches.append(
            Patch(
                target_ids=tuple(target_ids),
                target_position=position,
                target_layer=t if t is not None else 0,
                vector=vector,
                target_site=self.site if vector is not None else "resid_post",
            )
        )
        self.cells.append((e, method, s, t, target_ids, position, source_ids, source_position, source_text, prompt))

    def plain(self, e, method: str, prompt: str, ids: list[int]) -> None:
        """An unpatched greedy answer to `prompt` (the baselines and the single hops)."""
        self.add(e, method, None, None, ids, len(ids) - 1, None, ids, None, prompt, prompt)


def paper_pairs(path) -> dict[str, int]:
    """The paper's Table 8 (two-hop samples kept per relation pair), keyed like our rows' `relation`."""
    if not path:
        return {}
    path = Path(str(path)).expanduser()
    if not path.is_file():
        log.warning("paper table %s not found: the paper_samples column stays blank", path)
        return {}
    table = pd.read_csv(path)
    return {f"{a} -> {b}": int(n) for a, b, n in zip(table["hop1_relation"], table["hop2_relation"], table["samples"])}


def with_gains(record: dict) -> dict:
    """`<method>_gain` = a grid method's accuracy minus `source_in_prompt`'s (the source text given as text)."""
    if "source_in_prompt" in record:
        for method in GRID_METHODS:
            if method in record:
                record[f"{method}_gain"] = record[method] - record["source_in_prompt"]
    return record


class MultihopExperiment(Experiment):
    name = "multihop"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        relations = {r.key: r for r in load_relations(cfg.dataset.path, cfg.dataset.get("relations"))}
        for relation in relations.values():
            self.load_drops.update(relation.dropped)
        overrides = dict(cfg.patchscope.get("target_prompts") or {})
        explicit = {(p.hop1, p.hop2): p for p in cfg.multihop.pairs}
        self.samples = []
        for a in relations.values():
            for b in relations.values():
                if a.key == b.key and (a.key, b.key) not in explicit:  # a self-chain only when configured
                    continue
                subjects_b = {s["subject"]: s["object"] for s in b.samples}
                joined = [(s, subjects_b[s["object"]]) for s in a.samples if s["object"] in subjects_b]
                if not joined:
                    continue
                spec = explicit.get((a.key, b.key))
                range_name = a.properties.get("range_name") or "answer"
                phrase = spec.phrase if spec else f"the {range_name} of {{}}"
                question = spec.question if spec else b.templates[0].replace("{}", phrase)
                hop2_prompt = overrides.get(b.key) or b.target_prompt(cfg.patchscope.placeholder)
                for i, (s, answer) in enumerate(joined[: cfg.multihop.per_pair_limit or None]):
                    self.samples.append(
                        {
                            "example_id": f"{a.key}+{b.key}/{i}",
                            "relation": f"{a.key} -> {b.key}",
                            "subject": s["subject"],
                            "bridge": s["object"],
                            "object": answer,
                            "phrase": phrase.replace("{}", s["subject"]),
                            "question": question.replace("{}", s["subject"]),
                            "hop1_prompt": a.templates[0].replace("{}", s["subject"]),
                            "hop2_prompt_filled": b.templates[0].replace("{}", s["object"]),
                            "hop2_prompt": hop2_prompt,
                        }
                    )
        if not self.samples:
            raise UserError(f"no two relations in {cfg.dataset.path} chain (no hop-1 object is a hop-2 subject)")
        directions = list(cfg.multihop.directions)
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad:
            raise UserError(f"unknown multihop.directions value {bad[0]!r}; choose from {', '.join(DIRECTIONS)}")
        self.controls = controls.check(cfg, self.name)
        self.nulls = controls.NullStates()

    def bind(self, view) -> None:
        super().bind(view)
        self.pairs = layer_pairs(
            self.cfg.sweep.source_layers, self.cfg.sweep.target_layers, view.n_blocks, view.n_blocks
        )
        self.layers = sorted({s for s, _ in self.pairs} | {t for _, t in self.pairs})

    def examples(self) -> list[dict]:
        """The two-hop samples; `dataset.limit` applies here, before the single-hop filter (per chunk).
        With the `mean` control, the mean source states of every candidate are captured here."""
        limit = self.cfg.dataset.get("limit")
        out = [dict(s) for s in (self.samples[: int(limit)] if limit else self.samples)]
        if "mean" in self.controls:
            sources: dict[str, list] = {}
            kinds = self._configured_kinds()
            for e in out:
                for kind, (ids, position) in self._sources(e).items():
                    if kind in kinds:
                        sources.setdefault(kind, []).append((ids, position))
            self.nulls = controls.NullStates.capture(self, self.view, sources, sorted({s for s, _ in self.pairs}))
        return out

    def _sources(self, e: dict) -> dict[str, tuple[list[int], int]]:
        """(ids, position) where each source kind of SOURCE_KINDS is read: the one derivation the grid's
        capture and the `mean` control's share, so the mean averages the very states the grid patches."""
        view = self.view
        src_ids, src_pos = span_last_token(view, e["question"], e["phrase"])
        head_ids, q_ids, phrase_ids = (view.encode(t) for t in (self._hop2_head(e), e["question"], e["phrase"]))
        return {
            "phrase_in_question": (src_ids[: src_pos + 1], src_pos),
            "head": (head_ids, len(head_ids) - 1),
            "question": (q_ids, len(q_ids) - 1),
            "phrase": (phrase_ids, len(phrase_ids) - 1),
        }

    def _configured_kinds(self) -> set[str]:
        """The source kinds the configured grid methods read."""
        directions = self.cfg.multihop.directions
        methods = {"paper": "patchscope", "code": "patchscope_code", "cot": "patchscope_cot"}
        kinds = {SOURCE_KINDS[methods[d]] for d in directions}
        return kinds | ({SOURCE_KINDS["backpatch"]} if self.cfg.multihop.backpatch else set())

    def _hop2_head(self, e: dict) -> str:
        """The hop-2 prompt's text before its placeholder ("The capital city of")."""
        placeholder, occurrence = self.cfg.patchscope.placeholder, self.cfg.patchscope.get("placeholder_occurrence")
        return e["hop2_prompt"][: find_word(e["hop2_prompt"], placeholder, "placeholder", occurrence)[0]].rstrip()

    def _source_in_prompt(self, work: _Work, e: dict) -> None:
        """The `source_in_prompt` control, from the first of multihop.directions (module docstring)."""
        direction = list(self.cfg.multihop.directions)[0]
        question, phrase = e["question"], e["phrase"]
        if direction == "paper":
            source, prompt = question[: question.rfind(phrase) + len(phrase)], e["hop2_prompt"]
        elif direction == "code":
            source, prompt = self._hop2_head(e), phrase
        else:
            at = question.find(phrase)
            source, prompt = phrase, question[:at].rstrip() if at > 0 else question
        text = controls.source_in_prompt(self.cfg, source, prompt)
        ids = self.view.encode(text)
        work.add(e, "source_in_prompt", None, None, ids, len(ids) - 1, None, ids, None, source, text)

    def _add_nulls(self, work: _Work) -> None:
        """The `zero` and `mean` controls: every grid cell again with its vector nulled."""
        nulls = [c for c in self.controls if c in controls.NULL_PATCHES]
        for cell, patch in list(zip(work.cells, work.patches)):
            e, method, s, t, t_ids, t_pos, s_ids, s_pos, s_text, prompt = cell
            if method not in GRID_METHODS:
                continue
            for control in nulls:
                vector = self.nulls.vector(control, patch.vector, SOURCE_KINDS[method], s)
                work.add(e, control, s, t, t_ids, t_pos, vector, s_ids, s_pos, s_text, prompt)
                work.null_of[-1] = method

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        """The single-hop filter (one generate call for both hops of every example; `hop1`/`hop2`
        rows, so filtered examples count as done), then for the examples kept one capture of all
        their source states and one generate call for the baselines and the patched grid."""
        rows: list[dict] = []
        kept = examples
        if self.cfg.multihop.require_single_hops:
            work = _Work(self.target_site)
            for e in examples:
                work.plain(e, "hop1", e["hop1_prompt"], self.view.encode(e["hop1_prompt"]))
                work.plain(e, "hop2", e["hop2_prompt_filled"], self.view.encode(e["hop2_prompt_filled"]))
            rows = self._rows(work, self.engine.generate(self.view, work.patches, **self._generation(work)))
            failed = {r["example_id"] for r in rows if not r["correct"]}
            kept = [e for e in examples if self.planning or e["example_id"] not in failed]
        if kept:
            rows += self._grid(kept, progress)
        return self.frame(rows)

    def _generation(self, work: _Work) -> dict:
        """generate's arguments: each row may stop once its answer appears (generation.stop_when_correct)."""
        stops = None
        if self.stop_when_correct:
            cs = self.cfg.generation.case_sensitive
            stops = [StopWhenFound(e["bridge"] if m == "hop1" else e["object"], cs) for e, m, *_ in work.cells]
        return {"max_new_tokens": int(self.cfg.generation.max_new_tokens), "stops": stops, **self.generating()}

    def _grid(self, examples: list[dict], progress: Callable[[int], None]) -> list[dict]:
        view, cfg = self.view, self.cfg
        placeholder, occurrence = cfg.patchscope.placeholder, cfg.patchscope.get("placeholder_occurrence")
        work = _Work(self.target_site)
        add = work.add
        prompts, sources, positions = [], [], []
        for e in examples:
            q_ids = view.encode(e["question"])
            work.plain(e, "vanilla", e["question"], q_ids)
            cot = cfg.multihop.cot_prefix + e["question"]
            work.plain(e, "cot", cot, view.encode(cot))
            hop2_ids, hop2_pos = placeholder_position(view, e["hop2_prompt"], placeholder, occurrence)
            read = self._sources(e)
            (src_ids, src_pos), head_ids, phrase_ids = read["phrase_in_question"], read["head"][0], read["phrase"][0]
            sources.append((q_ids, hop2_ids, hop2_pos, src_ids, src_pos, self._hop2_head(e), head_ids, phrase_ids))
            for kind in ("phrase_in_question", "head", "question", "phrase"):  # the order caps are read in below
                prompts.append(read[kind][0])
                positions.append([read[kind][1]])
        caps = self.engine.capture(
            view, prompts, self.layers, positions, batch_size=self.capture_batch_size(), site=self.source_site
        )
        for k, (e, (q_ids, hop2_ids, hop2_pos, src_ids, src_pos, head, head_ids, phrase_ids)) in enumerate(
            zip(examples, sources)
        ):
            phrase_state, head_state, question_state, alone_state = caps[4 * k : 4 * k + 4]
            if "cot" in cfg.multihop.directions:
                self._cot_cells(work, e, phrase_ids, alone_state)
            for s, t in self.pairs:
                if "paper" in cfg.multihop.directions:
                    add(
                        e,
                        "patchscope",
                        s,
                        t,
                        hop2_ids,
                        hop2_pos,
                        phrase_state.at(s),
                        src_ids,
                        src_pos,
                        e["question"],
                        e["hop2_prompt"],
                    )
                if "code" in cfg.multihop.directions:
                    add(
                        e,
                        "patchscope_code",
                        s,
                        t,
                        phrase_ids,
                        len(phrase_ids) - 1,
                        head_state.at(s),
                        head_ids,
                        len(head_ids) - 1,
                        head,
                        e["phrase"],
                    )
                if cfg.multihop.backpatch and t < s:
                    add(
                        e,
                        "backpatch",
                        s,
                        t,
                        q_ids,
                        len(q_ids) - 1,
                        question_state.at(s),
                        q_ids,
                        len(q_ids) - 1,
                        e["question"],
                        e["question"],
                    )
            if "source_in_prompt" in self.controls:
                self._source_in_prompt(work, e)
        self._add_nulls(work)
        return self._rows(work, self.engine.generate(view, work.patches, progress=progress, **self._generation(work)))

    def _cot_cells(self, work: _Work, e: dict, phrase_ids: list[int], phrase_state) -> None:
        """The paper's CoT Patchscope: π1 (the hop-1 phrase) alone at its last token, block ℓ, patched
        into π2 (the question's text before π1) alone at its last token, block ℓ*."""
        at = e["question"].find(e["phrase"])
        head = e["question"][:at].rstrip() if at > 0 else ""
        if not head:
            return
        head_ids = self.view.encode(head)
        for s, t in self.pairs:
            vector = phrase_state.at(s)
            work.add(
                e,
                "patchscope_cot",
                s,
                t,
                head_ids,
                len(head_ids) - 1,
                vector,
                phrase_ids,
                len(phrase_ids) - 1,
                e["phrase"],
                head,
            )

    def _rows(self, work: _Work, gens: list[list[int]]) -> list[dict]:
        view, cs = self.view, self.cfg.generation.case_sensitive
        rows = []
        for (e, method, s, t, t_ids, t_pos, s_ids, s_pos, s_text, prompt), of, gen in zip(
            work.cells, work.null_of, gens
        ):
            text = view.decode(gen)
            answer = e["bridge"] if method == "hop1" else e["object"]
            rows.append(
                {
                    **self.run_columns({**e, "ids": s_ids, "position": s_pos}, method, s, t_ids, t_pos, t),
                    "relation": e["relation"],
                    "subject": e["subject"],
                    "bridge": e["bridge"],
                    "object": e["object"],
                    "source_text": s_text,
                    "target_prompt": prompt,
                    "generation": text,
                    "correct": contains_answer(text, answer, cs),
                    "stop_when_correct": self.stop_when_correct,
                    "null_of": of,
                }
            )
        return rows

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        hops = df[df["method"].isin(HOP_METHODS)]
        single = {
            "candidates": int(df["example_id"].nunique()),
            **{
                f"{m}_correct": float(hops[hops["method"] == m]["correct"].astype(bool).mean())
                for m in HOP_METHODS
                if (hops["method"] == m).any()
            },
        }
        df = df[~df["method"].isin(HOP_METHODS)]
        if df.empty:
            log.warning("no two-hop sample passed the single-hop filter")
            return {
                "experiment": "multihop",
                "single_hop": single,
                "overall": {"n": 0},
                "pairs": [],
                "fixing_cells": [],
            }
        if "null_of" in df:  # a null patch is named with the method it nulls: zero(patchscope_cot)
            nulled = df["method"].isin(controls.NULL_PATCHES) & (df["null_of"].fillna("") != "")
            df = df.assign(method=df["method"].where(~nulled, df["method"] + "(" + df["null_of"].fillna("") + ")"))
        per_sample = df.groupby(["relation", "example_id", "method"])["correct"].any().unstack("method")
        vanilla_fail = ~per_sample["vanilla"].astype(bool)
        pairs = []
        for rel, group in per_sample.groupby(level="relation"):
            fails = ~group["vanilla"].astype(bool)
            record = {"relation": rel, "n": int(len(group)), "vanilla_failures": int(fails.sum())}
            for method in group.columns:
                record[method] = float(group[method].astype(bool).mean())
                if method in GRID_METHODS:
                    fixed = group.loc[fails, method].astype(bool)
                    record[f"{method}_fixes"] = float(fixed.mean()) if len(fixed) else float("nan")
            pairs.append(with_gains(record))
        overall = {"n": int(len(per_sample)), "vanilla_failures": int(vanilla_fail.sum())}
        for method in per_sample.columns:
            overall[method] = float(per_sample[method].astype(bool).mean())
            if method in GRID_METHODS:
                fixed = per_sample.loc[vanilla_fail, method].astype(bool)
                overall[f"{method}_fixes"] = float(fixed.mean()) if len(fixed) else float("nan")
        overall = with_gains(overall)
        failed_ids = set(per_sample.index[vanilla_fail.values].get_level_values("example_id"))
        grid = df[df["method"].isin(GRID_METHODS) & df["example_id"].isin(failed_ids)]
        cells = grid.groupby(["method", "source_layer", "target_layer"])["correct"].sum().reset_index()
        table8 = paper_pairs(cfg.multihop.get("paper_table8"))
        for record in pairs:
            record["paper_samples"] = table8.get(record["relation"])
        return {
            "experiment": "multihop",
            "single_hop": single,
            "overall": overall,
            "pairs": pairs,
            "paper": {k: float(v) for k, v in (cfg.multihop.get("paper") or {}).items()},
            "fixing_cells": cells.to_dict("records"),
        }

    @staticmethod
    def report(metrics: dict) -> str:
        table = pd.DataFrame(metrics["pairs"] + [{"relation": "all", **metrics["overall"]}]).set_index("relation")
        single = metrics.get("single_hop", {})
        kept = (
            f"{metrics['overall']['n']} of {single['candidates']} samples answered hop by hop\n"
            if "candidates" in single
            else ""
        )
        paper = metrics.get("paper") or {}
        ours = metrics["overall"]
        beside = (
            "paper (Vicuna 13B, 46 samples, %) beside ours (%): "
            + ", ".join(
                f"{m} {v:.2f} vs {100 * ours[m]:.2f}" if m in ours else f"{m} {v:.2f} vs -" for m, v in paper.items()
            )
            + "\n"
            if paper
            else ""
        )
        return (
            kept
            + beside
            + "multi-hop accuracy (a grid method counts if any (ℓ, ℓ*) gives the answer); *_fixes = share of "
            "vanilla failures fixed; paper_samples = the pair's samples in the paper's Table 8; zero(m) / mean(m) = "
            "method m with a null vector; *_gain = minus source_in_prompt\n"
            + table.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
        )

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import heatmap

        cells = pd.DataFrame(metrics["fixing_cells"])
        out = []
        for method, group in cells.groupby("method") if len(cells) else []:
            heat = group.pivot(index="source_layer", columns="target_layer", values="correct")
            out.append(
                heatmap(
                    heat,
                    run_dir / f"multihop_{method}_fixes.png",
                    f"{method}: vanilla failures fixed per (ℓ, ℓ*)",
                    "target block ℓ*",
                    "source block ℓ",
                    fmt=".0f",
                )
            )
        return out
