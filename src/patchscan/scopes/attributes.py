"""Attribute extraction (paper §4.2, Table 2): decode a subject's attribute from its state alone.

The subject's last-token state at block ℓ (found by token offsets in the source prompt) is
patched at the placeholder of a relation prompt ("The capital city of x") at block ℓ*, and the
greedy continuation is checked for the object. A sample counts as correct at ℓ if any ℓ*
succeeds (the paper's aggregation). Baselines in the same rows: a linear probe per block
(logistic regression, k-fold cross-validation) on the same states, and the continuation of the
target prompt with the subject written in (the paper's filter).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from patchscan.data.lre import load_patchscopes_tsv, load_relations, relation_key
from patchscan.data.texts import read_lines
from patchscan.engine import Patch, capture, generate
from patchscan.errors import UserError
from patchscan.metrics.text import contains_answer
from patchscan.prompts import placeholder_position, span_last_token
from patchscan.scopes.base import Scope
from patchscan.sweep import layer_pairs

log = logging.getLogger(__name__)
SOURCE_KINDS = ("subject", "template", "texts")
# Paper Table 2 (Vicuna 13B): (linear probe, Patchscope) accuracy by task. Only tasks present here
# can be compared; fill in from the paper where a task is missing (None shows as blank).
PAPER_TABLE2: dict[str, tuple[float, float]] = {}


def fill_placeholder(prompt: str, placeholder: str, subject: str) -> str:
    at = prompt.rfind(placeholder)
    return prompt[:at] + subject + prompt[at + len(placeholder):]


class AttributeScope(Scope):
    name = "attribute_extraction"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        kind = cfg.source.kind
        if kind not in SOURCE_KINDS:
            raise UserError(f"unknown source.kind {kind!r}; choose from {', '.join(SOURCE_KINDS)}")
        self.texts = read_lines(cfg.source.texts_path, "source texts file") if kind == "texts" else []
        if cfg.dataset.get("tsv"):
            self.samples = self._tsv_samples(cfg.dataset.tsv)
        else:
            self.samples = self._lre_samples(cfg.dataset)

    def _lre_samples(self, dcfg) -> list[dict]:
        relations = load_relations(dcfg.path, dcfg.get("relations"))
        overrides = dict(self.cfg.patchscope.get("target_prompts") or {})
        placeholder = self.cfg.patchscope.placeholder
        out = []
        for rel in relations:
            prompt = self.cfg.patchscope.get("target_prompt") or overrides.get(rel.key) or rel.target_prompt(placeholder)
            for i, s in enumerate(rel.samples[: dcfg.get("per_relation_limit") or None]):
                out.append({"example_id": f"{rel.key}/{i}", "relation": rel.key, "subject": s["subject"],
                            "object": s["object"], "target_prompt": prompt, "template": rel.templates[0]
                            if rel.templates else rel.templates_zs[0]})
        return out

    def _tsv_samples(self, path) -> list[dict]:
        """One example per TSV row: a sample_id repeats over the source snippets of one subject."""
        relation = relation_key(Path(path).stem)
        out, bare = [], 0
        for n, row in enumerate(load_patchscopes_tsv(path)):
            source = row["prompt_source"] if row["subject"] in (row["prompt_source"] or "") else row["subject"]
            bare += source is not row["prompt_source"]
            out.append({"example_id": f"{relation}/{n}", "relation": relation, "sample_id": row["sample_id"],
                        "subject": row["subject"], "object": row["object"], "target_prompt": row["prompt_target"],
                        "source_prompt": source})
        if bare:
            log.warning("%s: %d of %d rows have no source text containing their subject; their source is the "
                        "subject alone", path, bare, len(out))
        return out

    def bind(self, view) -> None:
        super().bind(view)
        self.pairs = layer_pairs(self.cfg.sweep.source_layers, self.cfg.sweep.target_layers,
                                 view.n_blocks, view.n_blocks)
        self.source_layers = sorted({s for s, _ in self.pairs})
        placeholder = self.cfg.patchscope.placeholder
        self.targets = {p: placeholder_position(view, p, placeholder) for p in {s["target_prompt"] for s in self.samples}}

    def _source_text(self, sample: dict) -> str | None:
        kind = self.cfg.source.kind
        if "source_prompt" in sample:
            return sample["source_prompt"]
        if kind == "subject":
            return sample["subject"]
        if kind == "template":
            return sample["template"].replace("{}", sample["subject"])
        return next((t for t in self.texts if sample["subject"] in t), None)

    def examples(self) -> list[dict]:
        view, cfg = self.view, self.cfg
        out, no_text = [], 0
        for sample in self.samples:
            text = self._source_text(sample)
            if text is None:
                no_text += 1
                continue
            ids, position = span_last_token(view, text, sample["subject"])
            out.append({**sample, "source_text": text, "ids": ids[: position + 1], "position": position})
        if no_text:
            log.info("%d samples have no source text containing their subject", no_text)
        limit = cfg.dataset.get("limit")
        out = out[: int(limit)] if limit else out
        if not out:
            raise UserError("no attribute-extraction sample left (check dataset.relations and source.kind)")
        self._baselines(out)
        if cfg.filter:
            before = len(out)
            out = [e for e in out if e["filled_correct"]]
            log.info("filter: %d of %d samples answered with the subject written in", len(out), before)
            if not out:
                raise UserError("filter=true left no sample: the model answers none with the subject written in")
        if cfg.probe.enabled:
            self._probe(out)
        return out

    def _baselines(self, examples: list[dict]) -> None:
        """The target prompt with the subject written in, unpatched: the paper's filter."""
        placeholder, n_new = self.cfg.patchscope.placeholder, int(self.cfg.generation.max_new_tokens)
        filled = [self.view.encode(fill_placeholder(e["target_prompt"], placeholder, e["subject"])) for e in examples]
        gens = generate(self.view, [Patch(tuple(ids), len(ids) - 1, 0, None) for ids in filled],
                        max_new_tokens=n_new, **self.batching())
        for e, ids, gen in zip(examples, filled, gens):
            e["filled_generation"] = self.view.decode(gen)
            e["filled_correct"] = contains_answer(e["filled_generation"], e["object"], self.cfg.generation.case_sensitive)

    def _probe(self, examples: list[dict]) -> None:
        """Cross-validated logistic-regression predictions of the object, per relation and block."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import KFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        caps = capture(self.view, [e["ids"] for e in examples], self.source_layers, [[e["position"]] for e in examples],
                       batch_size=self.capture_batch_size())
        folds = int(self.cfg.probe.folds)
        by_relation: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            e["probe"] = {}
            by_relation.setdefault(e["relation"], []).append(i)
        for rel, idx in by_relation.items():
            labels = np.array([examples[i]["object"] for i in idx])
            if len(idx) < folds:
                continue
            for k, layer in enumerate(self.source_layers):
                x = np.stack([caps[i].states[k, 0].float().numpy() for i in idx])
                preds = np.empty(len(idx), dtype=object)
                for train, test in KFold(folds, shuffle=True, random_state=int(self.cfg.runner.seed)).split(x):
                    if len(set(labels[train])) < 2:
                        preds[test] = labels[train][0]
                        continue
                    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
                    preds[test] = clf.fit(x[train], labels[train]).predict(x[test])
                for j, i in enumerate(idx):
                    examples[i]["probe"][layer] = str(preds[j])

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        view, cfg = self.view, self.cfg
        caps = capture(view, [e["ids"] for e in examples], self.source_layers, [[e["position"]] for e in examples],
                       batch_size=self.capture_batch_size())
        patches, cells = [], []
        for e, cap in zip(examples, caps):
            ids, pos = self.targets[e["target_prompt"]]
            for s, t in self.pairs:
                patches.append(Patch(tuple(ids), pos, t, cap.at(s)))
                cells.append((e, s, t, ids, pos))
        gens = generate(view, patches, max_new_tokens=int(cfg.generation.max_new_tokens), progress=progress,
                        **self.batching())
        rows = []
        for (e, s, t, ids, pos), gen in zip(cells, gens):
            text = view.decode(gen)
            rows.append(self._row(e, "patchscope", s, t, ids, pos, text,
                                  contains_answer(text, e["object"], cfg.generation.case_sensitive)))
        for e in examples:
            for layer, pred in e.get("probe", {}).items():
                rows.append(self._row(e, "linear_probe", layer, None, [], None, pred, pred == e["object"]))
        return pd.DataFrame(rows)

    def _row(self, e, method, s, t, ids, pos, generation, correct) -> dict:
        return {"example_id": e["example_id"], "method": method, **self.common_columns(),
                "relation": e["relation"], "subject": e["subject"], "object": e["object"],
                "source_text": e["source_text"], "source_token_ids": e["ids"], "source_position": e["position"],
                "source_layer": s, "target_prompt": e["target_prompt"], "target_token_ids": list(ids),
                "target_position": pos, "target_layer": t, "generation": generation, "correct": bool(correct),
                "filled_generation": e["filled_generation"], "filled_correct": bool(e["filled_correct"])}

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        patch = df[df["method"] == "patchscope"]
        # a sample is correct at ℓ if any ℓ* succeeds
        any_t = patch.groupby(["relation", "example_id", "source_layer"])["correct"].any().reset_index()
        filled = df.drop_duplicates("example_id").set_index("example_id")["filled_correct"]
        any_t["filled_correct"] = any_t["example_id"].map(filled)
        probe = df[df["method"] == "linear_probe"]
        tasks = []
        for rel, group in any_t.groupby("relation"):
            per_layer = group.groupby("source_layer")["correct"].mean()
            kept = group[group["filled_correct"]].groupby("source_layer")["correct"].mean()
            rel_probe = probe[probe["relation"] == rel].groupby("source_layer")["correct"].mean()
            paper = PAPER_TABLE2.get(rel, (math.nan, math.nan))
            tasks.append({
                "task": rel, "n": int(group["example_id"].nunique()),
                "n_filtered": int(group[group["filled_correct"]]["example_id"].nunique()),
                "probe": float(rel_probe.max()) if len(rel_probe) else math.nan,
                "probe_layer": int(rel_probe.idxmax()) if len(rel_probe) else None,
                "patchscope": float(per_layer.max()), "patchscope_layer": int(per_layer.idxmax()),
                "patchscope_filtered": float(kept.max()) if len(kept) else math.nan,
                "paper_probe": paper[0], "paper_patchscope": paper[1],
            })
        heat = patch.groupby(["source_layer", "target_layer"])["correct"].mean().reset_index()
        layer_curve = any_t.groupby("source_layer")["correct"].mean()
        probe_curve = probe.groupby("source_layer")["correct"].mean()
        return {"experiment": "attribute_extraction", "n_examples": int(df["example_id"].nunique()),
                "tasks": tasks, "heatmap": heat.to_dict("records"),
                "by_layer": [{"source_layer": int(l), "patchscope": float(v),
                              "linear_probe": float(probe_curve.get(l, math.nan))} for l, v in layer_curve.items()]}

    @staticmethod
    def report(metrics: dict) -> str:
        table = pd.DataFrame(metrics["tasks"]).set_index("task")
        cols = ["n", "n_filtered", "probe", "patchscope", "patchscope_filtered", "paper_probe", "paper_patchscope"]
        return ("attribute extraction: accuracy at the best source block (a sample counts if any target block "
                "succeeds); probe = logistic regression, cross-validated\n"
                + table[cols].to_string(float_format=lambda x: f"{x:.3f}", na_rep="-"))

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import heatmap, method_curves

        heat = pd.DataFrame(metrics["heatmap"]).pivot(index="source_layer", columns="target_layer", values="correct")
        by = pd.DataFrame(metrics["by_layer"]).melt(id_vars="source_layer", var_name="method", value_name="accuracy")
        return [heatmap(heat, run_dir / "attribute_heatmap.png", "Attribute extraction accuracy by (ℓ, ℓ*)",
                        "target block ℓ*", "source block ℓ"),
                method_curves(by, ["accuracy"], ["accuracy (any ℓ*)"], run_dir / "attribute_by_layer.png",
                              title="Attribute extraction: Patchscope vs linear probe")]
