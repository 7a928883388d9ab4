"""Attribute extraction (paper §4.2, Table 2): decode a subject's attribute from its state alone.

The subject's last-token state at block ℓ (found by token offsets in the source prompt) is
patched at the placeholder of a relation prompt ("The capital city of x") at block ℓ*, and the
greedy continuation is checked for the object. A sample counts as correct at ℓ if any ℓ*
succeeds (the paper's aggregation). Baselines: the continuation of the target prompt with the
subject written in (the paper's filter; a `subject_in_prompt` row per example, and the
`filled_generation` / `filled_correct` columns on every row), and a linear probe per block
(logistic regression, k-fold cross-validation) on the same states, which `source_state` rows
store and `metrics` fits (so `patchscan eval` recomputes it, over all shards).
All model work runs per chunk: shards split it and a resume redoes only missing chunks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from patchscan.data.lre import load_patchscopes_tsv, load_relations, relation_key
from patchscan.data.texts import read_lines
from patchscan.engine import Patch
from patchscan.errors import UserError
from patchscan.metrics.answers import StopWhenFound
from patchscan.metrics.text import contains_answer
from patchscan.prompts import placeholder_position, span_last_token
from patchscan.scopes.base import Scope
from patchscan.sweep import layer_pairs

log = logging.getLogger(__name__)
SOURCE_KINDS = ("subject", "template", "texts")
# Paper Table 2 (Vicuna 13B): (linear probe, Patchscope) accuracy by task. Only tasks present here
# can be compared; fill in from the paper where a task is missing (None shows as blank).
PAPER_TABLE2: dict[str, tuple[float, float]] = {}
EMPTY_STATE = np.zeros(0, dtype=np.float32)  # rows other than source_state: an empty list<float>


def fill_placeholder(prompt: str, placeholder: str, subject: str) -> str:
    at = prompt.rfind(placeholder)
    return prompt[:at] + subject + prompt[at + len(placeholder) :]


def _example_order(example_id: str) -> tuple:
    """ "relation/12" sorts by relation, then by number (not as text)."""
    head, _, tail = str(example_id).rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (head, -1, tail)


def probe_predictions(df: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """The linear-probe baseline from stored source states: per relation and block, a logistic
    regression predicts the object from the subject's state, with seeded k-fold cross-validation.

    Returns one row per (example, block): relation, example_id, source_layer, generation (the
    prediction), correct. Runs written before states were stored carry `linear_probe` rows instead.
    """
    if "source_state" not in df or not (df["method"] == "source_state").any():
        return df[df["method"] == "linear_probe"]
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    states = df[df["method"] == "source_state"]
    out = []
    for (rel, layer), group in states.groupby(["relation", "source_layer"]):
        group = group.iloc[sorted(range(len(group)), key=lambda i: _example_order(group["example_id"].iloc[i]))]
        if len(group) < folds:
            continue
        x = np.stack([np.asarray(v, dtype=np.float32) for v in group["source_state"]])
        labels = group["object"].to_numpy()
        preds = np.empty(len(group), dtype=object)
        for train, test in KFold(folds, shuffle=True, random_state=seed).split(x):
            if len(set(labels[train])) < 2:
                preds[test] = labels[train][0]
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
            preds[test] = clf.fit(x[train], labels[train]).predict(x[test])
        out += [
            {"relation": rel, "example_id": i, "source_layer": int(layer), "generation": str(p), "correct": str(p) == o}
            for i, p, o in zip(group["example_id"], preds, labels)
        ]
    return pd.DataFrame(out, columns=["relation", "example_id", "source_layer", "generation", "correct"])


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
            prompt = (
                self.cfg.patchscope.get("target_prompt") or overrides.get(rel.key) or rel.target_prompt(placeholder)
            )
            for i, s in enumerate(rel.samples[: dcfg.get("per_relation_limit") or None]):
                out.append(
                    {
                        "example_id": f"{rel.key}/{i}",
                        "relation": rel.key,
                        "subject": s["subject"],
                        "object": s["object"],
                        "target_prompt": prompt,
                        "template": rel.templates[0] if rel.templates else rel.templates_zs[0],
                    }
                )
        return out

    def _tsv_samples(self, path) -> list[dict]:
        """One example per TSV row: a sample_id repeats over the source snippets of one subject."""
        relation = relation_key(Path(path).stem)
        out, bare = [], 0
        for n, row in enumerate(load_patchscopes_tsv(path)):
            source = row["prompt_source"] if row["subject"] in (row["prompt_source"] or "") else row["subject"]
            bare += source is not row["prompt_source"]
            out.append(
                {
                    "example_id": f"{relation}/{n}",
                    "relation": relation,
                    "sample_id": row["sample_id"],
                    "subject": row["subject"],
                    "object": row["object"],
                    "target_prompt": row["prompt_target"],
                    "source_prompt": source,
                }
            )
        if bare:
            log.warning(
                "%s: %d of %d rows have no source text containing their subject; their source is the subject alone",
                path,
                bare,
                len(out),
            )
        return out

    def bind(self, view) -> None:
        super().bind(view)
        self.pairs = layer_pairs(
            self.cfg.sweep.source_layers, self.cfg.sweep.target_layers, view.n_blocks, view.n_blocks
        )
        self.source_layers = sorted({s for s, _ in self.pairs})
        placeholder = self.cfg.patchscope.placeholder
        self.targets = {
            p: placeholder_position(view, p, placeholder) for p in {s["target_prompt"] for s in self.samples}
        }

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
        """Source prompts, tokenized; `dataset.limit` applies here, before the filter (which runs per chunk)."""
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
        return out

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        """The subject written into the target prompt (unpatched, the paper's filter), then for the
        examples kept the source states (one capture: the grid's vectors and the probe's inputs)
        and the patched (ℓ, ℓ*) grid in one generate call."""
        view, cfg = self.view, self.cfg
        n_new, cs = int(cfg.generation.max_new_tokens), cfg.generation.case_sensitive
        stop = bool(cfg.generation.get("stop_when_correct", True))
        placeholder = cfg.patchscope.placeholder
        texts = [fill_placeholder(e["target_prompt"], placeholder, e["subject"]) for e in examples]
        filled = [view.encode(text) for text in texts]
        gens = self.engine.generate(
            view,
            [Patch(target_ids=tuple(ids), target_position=len(ids) - 1, target_layer=0, vector=None) for ids in filled],
            max_new_tokens=n_new,
            stops=[StopWhenFound(e["object"], cs) if stop else None for e in examples],
            **self.generating(),
        )
        rows = []
        for e, text, ids, gen in zip(examples, texts, filled, gens):
            e["filled_generation"] = view.decode(gen)
            e["filled_correct"] = contains_answer(e["filled_generation"], e["object"], cs)
            rows.append(
                self._row(
                    e,
                    "subject_in_prompt",
                    None,
                    None,
                    ids,
                    len(ids) - 1,
                    e["filled_generation"],
                    e["filled_correct"],
                    target_prompt=text,
                )
            )
        kept = [e for e in examples if e["filled_correct"] or not cfg.filter or self.planning]
        if not kept:
            return self.frame(rows)
        caps = self.engine.capture(
            view,
            [e["ids"] for e in kept],
            self.source_layers,
            [[e["position"]] for e in kept],
            batch_size=self.capture_batch_size(),
        )
        patches, cells = [], []
        for e, cap in zip(kept, caps):
            ids, pos = self.targets[e["target_prompt"]]
            for s, t in self.pairs:
                patches.append(Patch(target_ids=tuple(ids), target_position=pos, target_layer=t, vector=cap.at(s)))
                cells.append((e, s, t, ids, pos))
        stops = [StopWhenFound(e["object"], cs) if stop else None for e, *_ in cells]
        gens = self.engine.generate(
            view, patches, max_new_tokens=n_new, progress=progress, stops=stops, **self.generating()
        )
        for (e, s, t, ids, pos), gen in zip(cells, gens):
            text = view.decode(gen)
            rows.append(self._row(e, "patchscope", s, t, ids, pos, text, contains_answer(text, e["object"], cs)))
        if cfg.probe.enabled:  # the probe's inputs; fitted from these rows by `metrics` (patchscan eval)
            for e, cap in zip(kept, caps):
                for layer in self.source_layers:
                    rows.append(
                        self._row(
                            e,
                            "source_state",
                            layer,
                            None,
                            [],
                            None,
                            None,
                            None,
                            source_state=cap.at(layer).float().cpu().numpy(),
                        )
                    )
        return self.frame(rows)

    def _row(self, e, method, s, t, ids, pos, generation, correct, target_prompt=None, source_state=None) -> dict:
        return {
            "example_id": e["example_id"],
            "method": method,
            **self.common_columns(),
            "relation": e["relation"],
            "subject": e["subject"],
            "object": e["object"],
            "source_text": e["source_text"],
            "source_token_ids": e["ids"],
            "source_position": e["position"],
            "source_layer": s,
            "target_prompt": target_prompt or e["target_prompt"],
            "target_token_ids": list(ids),
            "target_position": pos,
            "target_layer": t,
            "generation": generation,
            "correct": correct if correct is None else bool(correct),
            "filled_generation": e["filled_generation"],
            "filled_correct": bool(e["filled_correct"]),
            "stop_when_correct": bool(self.cfg.generation.get("stop_when_correct", True)),
            "source_state": EMPTY_STATE if source_state is None else source_state,
        }

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        patch = df[df["method"] == "patchscope"]
        # a sample is correct at ℓ if any ℓ* succeeds
        any_t = patch.groupby(["relation", "example_id", "source_layer"])["correct"].any().reset_index()
        filled = df.drop_duplicates("example_id").set_index("example_id")["filled_correct"]
        any_t["filled_correct"] = any_t["example_id"].map(filled)
        probe = probe_predictions(df, int(cfg.probe.folds), int(cfg.runner.seed))
        tasks = []
        for rel, group in any_t.groupby("relation"):
            per_layer = group.groupby("source_layer")["correct"].mean()
            kept = group[group["filled_correct"]].groupby("source_layer")["correct"].mean()
            rel_probe = probe[probe["relation"] == rel].groupby("source_layer")["correct"].mean()
            paper = PAPER_TABLE2.get(rel, (math.nan, math.nan))
            tasks.append(
                {
                    "task": rel,
                    "n": int(group["example_id"].nunique()),
                    "n_filtered": int(group[group["filled_correct"]]["example_id"].nunique()),
                    "probe": float(rel_probe.max()) if len(rel_probe) else math.nan,
                    "probe_layer": int(rel_probe.idxmax()) if len(rel_probe) else None,
                    "patchscope": float(per_layer.max()),
                    "patchscope_layer": int(per_layer.idxmax()),
                    "patchscope_filtered": float(kept.max()) if len(kept) else math.nan,
                    "paper_probe": paper[0],
                    "paper_patchscope": paper[1],
                }
            )
        heat = patch.groupby(["source_layer", "target_layer"])["correct"].mean().reset_index()
        layer_curve = any_t.groupby("source_layer")["correct"].mean()
        probe_curve = probe.groupby("source_layer")["correct"].mean()
        return {
            "experiment": "attribute_extraction",
            "n_examples": int(df["example_id"].nunique()),
            "tasks": tasks,
            "heatmap": heat.to_dict("records"),
            "by_layer": [
                {"source_layer": int(b), "patchscope": float(v), "linear_probe": float(probe_curve.get(b, math.nan))}
                for b, v in layer_curve.items()
            ],
        }

    @staticmethod
    def report(metrics: dict) -> str:
        table = pd.DataFrame(metrics["tasks"]).set_index("task")
        cols = ["n", "n_filtered", "probe", "patchscope", "patchscope_filtered", "paper_probe", "paper_patchscope"]
        return (
            "attribute extraction: accuracy at the best source block (a sample counts if any target block "
            "succeeds); probe = logistic regression, cross-validated\n"
            + table[cols].to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
        )

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import heatmap, method_curves

        heat = pd.DataFrame(metrics["heatmap"]).pivot(index="source_layer", columns="target_layer", values="correct")
        by = pd.DataFrame(metrics["by_layer"]).melt(id_vars="source_layer", var_name="method", value_name="accuracy")
        return [
            heatmap(
                heat,
                run_dir / "attribute_heatmap.png",
                "Attribute extraction accuracy by (ℓ, ℓ*)",
                "target block ℓ*",
                "source block ℓ",
            ),
            method_curves(
                by,
                ["accuracy"],
                ["accuracy (any ℓ*)"],
                run_dir / "attribute_by_layer.png",
                title="Attribute extraction: Patchscope vs linear probe",
            ),
        ]
