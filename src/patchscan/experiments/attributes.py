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
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from patchscan.data.drops import nothing_left
from patchscan.data.lre import load_relations
from patchscan.data.patchscopes_tsv import tsv_samples
from patchscan.data.texts import read_lines
from patchscan.engine import Patch, Scale
from patchscan.errors import UserError
from patchscan.experiments import controls
from patchscan.experiments.base import Experiment
from patchscan.experiments.prompts import (
    fill_placeholder,
    placeholder_position,
    span_last_token,
    tokens_of_span,
    word_spans,
)
from patchscan.grids import layer_pairs
from patchscan.metrics.answers import StopWhenFound
from patchscan.metrics.stats import any_target_block
from patchscan.metrics.table2 import attribute_table, format_table, read_paper_table
from patchscan.metrics.text import contains_answer

log = logging.getLogger(__name__)
SOURCE_KINDS = ("subject", "template", "texts")
CONTROLS = ("prompt_only", "embedding_only", "shuffled_source")  # subject_in_prompt always runs (the filter)
# and the shared ones (experiments.controls): source_in_prompt, zero, mean
EMPTY_STATE = np.zeros(0, dtype=np.float32)  # rows other than source_state: an empty list<float>


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


class _Work:
    """Patched runs for the engine (`patches`) and, in the same order, what each row needs (`cells`)."""

    def __init__(self, site: str):
        self.site = site  # the target site of every patched run
        self.patches: list[Patch] = []
        self.cells: list[tuple] = []

    def add(self, e: dict, method: str, s, t, target: tuple[str, list[int], int], vector) -> None:
        _, ids, pos = target
        layer = 0 if t is None else t
        site = self.site if vector is not None else "resid_post"
        self.patches.append(
            Patch(target_ids=tuple(ids), target_position=pos, target_layer=layer, vector=vector, target_site=site)
        )
        self.cells.append((e, method, s, t, target))


def _source_key(example: dict) -> tuple:
    """What determines a source state: the prompt's tokens and the position read."""
    return tuple(example["ids"]), example["position"]


def attach_donors(examples: list[dict]) -> None:
    """Give each example the source of the next example of its relation whose subject differs (cyclic):
    the `shuffled_source` control patches that state, so its accuracy is the chance level of a
    "correct" answer on this relation. An example whose relation has one subject gets no donor."""
    by_relation: dict[str, list[dict]] = {}
    for e in examples:
        by_relation.setdefault(e["relation"], []).append(e)
    for group in by_relation.values():
        for k, e in enumerate(group):
            others = group[k + 1 :] + group[:k]
            donor = next((d for d in others if d["subject"] != e["subject"]), None)
            keys = ("subject", "source_text", "ids", "position")
            e["donor"] = {key: donor[key] for key in keys} if donor else None


def placeholder_text(view, choice, seed: int) -> str | None:
    """What replaces the placeholder in the target prompts: None keeps it; `random` draws one
    vocabulary token (seeded: a space and letters, one token when encoded again); else the text itself."""
    if choice is None or str(choice) == "":
        return None
    if str(choice) != "random":
        return str(choice)
    rng = np.random.default_rng(seed)
    for token in rng.permutation(view.vocab_size)[:20000]:
        text = view.decode([int(token)])
        if len(text) > 2 and text[0] == " " and text[1:].isalpha() and len(view.encode(text)) == 1:
            return text.lstrip()
    raise UserError("no random placeholder token found (a space and letters, one token)")


class AttributeExperiment(Experiment):
    name = "attribute_extraction"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        kind = cfg.source.kind
        if kind not in SOURCE_KINDS:
            raise UserError(f"unknown source.kind {kind!r}; choose from {', '.join(SOURCE_KINDS)}")
        self.controls = controls.check(cfg, self.name, CONTROLS)
        self.nulls = controls.NullStates()
        self.scale = Scale(cfg.patchscope.get("scale", 1.0) or 1.0)
        self.texts = read_lines(cfg.source.texts_path, "source texts file") if kind == "texts" else []
        dcfg = cfg.dataset
        if dcfg.get("tsv"):
            limit = dcfg.get("per_relation_limit") if dcfg.get("kind") == "patchscopes_tsv" else None
            missing = dcfg.get("missing_source") or "subject"
            self.samples = tsv_samples(dcfg.tsv, dcfg.get("relations"), limit, missing, dropped=self.load_drops)
        else:
            self.samples = self._lre_samples(dcfg)

    def _lre_samples(self, dcfg) -> list[dict]:
        relations = load_relations(dcfg.path, dcfg.get("relations"))
        for rel in relations:
            self.load_drops.update(rel.dropped)
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

    def bind(self, view) -> None:
        super().bind(view)
        self.pairs = layer_pairs(
            self.cfg.sweep.source_layers, self.cfg.sweep.target_layers, view.n_blocks, view.n_blocks
        )
        self.source_layers = sorted({s for s, _ in self.pairs})
        self.target_layers = sorted({t for _, t in self.pairs})
        placeholder, occurrence = self.cfg.patchscope.placeholder, self.cfg.patchscope.get("placeholder_occurrence")
        text = placeholder_text(view, self.cfg.patchscope.get("placeholder_text"), int(self.cfg.runner.seed))
        self.targets = {}
        for prompt in {s["target_prompt"] for s in self.samples}:
            if text is None:
                self.targets[prompt] = (prompt, *placeholder_position(view, prompt, placeholder, occurrence))
            else:
                self.targets[prompt] = self._last_token_of(prompt, text)

    def _last_token_of(self, prompt: str, text: str) -> tuple[str, list[int], int]:
        """The prompt with its placeholder replaced by `text` (any number of tokens): the text, its
        ids, and the position of `text`'s last token."""
        cfg = self.cfg.patchscope
        filled, start, end = fill_placeholder(prompt, cfg.placeholder, text, cfg.get("placeholder_occurrence"))
        ids, _, last = tokens_of_span(self.view, filled, start, end, "placeholder text")
        return filled, ids, last

    def _source_text(self, sample: dict) -> str | None:
        kind = self.cfg.source.kind
        if "source_prompt" in sample:
            return sample["source_prompt"]
        if kind == "subject":
            return sample["subject"]
        if kind == "template":
            return sample["template"].replace("{}", sample["subject"])
        return next((t for t in self.texts if word_spans(t, sample["subject"].strip())), None)

    def examples(self) -> list[dict]:
        """Source prompts, tokenized, each with its `shuffled_source` donor (the next sample of its
        relation with another subject); `dataset.limit` applies here, before the filter (per chunk)."""
        view, cfg = self.view, self.cfg
        out = []
        self.example_drops = Counter()
        for sample in self.samples:
            text = self._source_text(sample)
            if text is None:
                self.example_drops["samples with no line of source.texts_path containing their subject"] += 1
                continue
            if not word_spans(text, sample["subject"].strip()):  # only inside another word ("fish" of "crayfish")
                self.example_drops["samples whose subject is not a word of its own in their source text"] += 1
                continue
            ids, position = span_last_token(view, text, sample["subject"])
            out.append({**sample, "source_text": text, "ids": ids[: position + 1], "position": position})
        attach_donors(out)
        limit = cfg.dataset.get("limit")
        out = out[: int(limit)] if limit else out
        if not out:
            raise UserError(
                nothing_left(
                    "no attribute-extraction sample left (check dataset.relations and source.kind)", self.dropped
                )
            )
        if "mean" in self.controls:  # the `mean` control's states: over every example, before shards split them
            sources = {"subject": [(e["ids"], e["position"]) for e in out]}
            self.nulls = controls.NullStates.capture(self, view, sources, self.source_layers)
        return out

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        """The subject written into the target prompt (unpatched, the paper's filter), then for the
        examples kept the source states (one capture: the grid's vectors, the probe's inputs and the
        shuffled donors' states) and the patched (ℓ, ℓ*) grid with the controls in one generate call."""
        view, cfg = self.view, self.cfg
        rows = self._filter_rows(examples)
        kept = [e for e in examples if e["filled_correct"] or not cfg.filter or self.planning]
        if not kept:
            return self.frame(rows)
        donors = [e for e in kept if "shuffled_source" in self.controls and e.get("donor")]
        sources = list(kept) + [e["donor"] for e in donors]
        # each distinct source once: a donor that is also kept gives the very same state, so its
        # shuffled_source runs equal that example's own runs and are generated once (engine.identical)
        keys = list(dict.fromkeys(_source_key(x) for x in sources))
        captured = self.engine.capture(
            view,
            [list(k[0]) for k in keys],
            self.source_layers,
            [[k[1]] for k in keys],
            batch_size=self.capture_batch_size(),
            site=self.source_site,
        )
        by_source = dict(zip(keys, captured))
        caps = [by_source[_source_key(x)] for x in sources]
        work = _Work(self.target_site)
        for e, cap in zip(kept, caps):
            for s, t in self.pairs:
                work.add(e, "patchscope", s, t, self._target(e), self.scale(cap.at(s)))
        for e, cap in zip(donors, caps[len(kept) :]):
            for s, t in self.pairs:
                work.add(e, "shuffled_source", s, t, self._target(e), self.scale(cap.at(s)))
        self._add_controls(work, kept, caps)
        n_new = int(cfg.generation.max_new_tokens)
        stops = self.stops([e["object"] for e, *_ in work.cells])
        gens = self.engine.generate(
            view, work.patches, max_new_tokens=n_new, progress=progress, stops=stops, **self.generating()
        )
        rows += self._generation_rows(work, gens)
        if cfg.probe.enabled:  # the probe's inputs; fitted from these rows by `metrics` (patchscan eval)
            for e, cap in zip(kept, caps):
                for layer in self.source_layers:
                    state = cap.at(layer).float().cpu().numpy()
                    rows.append(self._row(e, "source_state", layer, None, [], None, None, None, source_state=state))
        return self.frame(rows)

    def _generation_rows(self, work: _Work, gens: list[list[int]]) -> list[dict]:
        cs, rows = self.cfg.generation.case_sensitive, []
        for (e, method, s, t, (prompt, ids, pos)), gen in zip(work.cells, gens):
            text = self.view.decode(gen)
            row = self._row(
                e, method, s, t, ids, pos, text, contains_answer(text, e["object"], cs), target_prompt=prompt
            )
            if method == "shuffled_source":
                row.update(source_text=e["donor"]["source_text"], source_token_ids=e["donor"]["ids"])
                row.update(source_position=e["donor"]["position"], source_subject=e["donor"]["subject"])
            rows.append(row)
        return rows

    def stops(self, objects: list[str | None]) -> list:
        """Per-row stops: a row ends once its object appears (`generation.stop_when_correct`)."""
        cs = self.cfg.generation.case_sensitive
        return [StopWhenFound(o, cs) if o is not None and self.stop_when_correct else None for o in objects]

    def _target(self, e: dict) -> tuple[str, list[int], int]:
        return self.targets[e["target_prompt"]]

    def _filter_rows(self, examples: list[dict]) -> list[dict]:
        """`subject_in_prompt` rows: the target prompt with the subject written in, unpatched (the paper's filter)."""
        view, cfg = self.view, self.cfg
        placeholder = cfg.patchscope.placeholder
        occurrence = cfg.patchscope.get("placeholder_occurrence")
        texts = [fill_placeholder(e["target_prompt"], placeholder, e["subject"], occurrence)[0] for e in examples]
        filled = [view.encode(text) for text in texts]
        unique = list(dict.fromkeys(tuple(ids) for ids in filled))  # a sample's windows share one filled prompt
        objects: dict[tuple, set] = {}
        for e, ids in zip(examples, filled):
            objects.setdefault(tuple(ids), set()).add(e["object"])
        # a prompt shared by samples with different objects runs to the end (no single answer decides it)
        stops = self.stops([next(iter(objects[ids])) if len(objects[ids]) == 1 else None for ids in unique])
        answers = self.engine.generate(
            view,
            [Patch(target_ids=ids, target_position=len(ids) - 1, target_layer=0, vector=None) for ids in unique],
            max_new_tokens=int(cfg.generation.max_new_tokens),
            stops=stops,
            **self.generating(),
        )
        by_prompt = dict(zip(unique, answers))
        gens = [by_prompt[tuple(ids)] for ids in filled]
        rows = []
        for e, text, ids, gen in zip(examples, texts, filled, gens):
            e["filled_generation"] = view.decode(gen)
            e["filled_correct"] = contains_answer(e["filled_generation"], e["object"], cfg.generation.case_sensitive)
            generation, correct = e["filled_generation"], e["filled_correct"]
            rows.append(self._row(e, "subject_in_prompt", None, None, ids, len(ids) - 1, generation, correct, text))
        return rows

    def _add_controls(self, work: _Work, kept: list[dict], caps: list) -> None:
        """`prompt_only` (the target prompt unpatched, placeholder as is), `embedding_only` (the
        subject's last-token input embedding patched at each ℓ*, scaled like the states), and the shared
        ones (experiments.controls): `source_in_prompt` (the source text, then the target prompt without
        its placeholder, unpatched), `zero` and `mean` (the Patchscope's grid with a null vector)."""
        for e, cap in zip(kept, caps):
            prompt, ids, pos = self._target(e)
            for control in (c for c in self.controls if c in controls.NULL_PATCHES):
                for s, t in self.pairs:
                    vector = self.nulls.vector(control, cap.at(s), "subject", s)
                    work.add(e, control, s, t, (prompt, ids, pos), self.scale(vector))
            if "source_in_prompt" in self.controls:
                text = controls.source_in_prompt(self.cfg, e["source_text"], e["target_prompt"])
                plain = self.view.encode(text)
                work.add(e, "source_in_prompt", None, None, (text, plain, len(plain) - 1), None)
            if "prompt_only" in self.controls:
                work.add(e, "prompt_only", None, None, (prompt, ids, len(ids) - 1), None)
            if "embedding_only" in self.controls:
                vector = self.scale(self._input_embedding(e["ids"][e["position"]]))
                for t in self.target_layers:
                    work.add(e, "embedding_only", None, t, (prompt, ids, pos), vector)

    def _input_embedding(self, token_id: int) -> torch.Tensor:
        """What block 0 receives for this token (the model's own input embedding, with any scaling)."""
        with torch.no_grad():
            ids = torch.tensor([[int(token_id)]], device=self.view.input_device)
            return self.view.embed(ids)[0, 0]

    def _row(self, e, method, s, t, ids, pos, generation, correct, target_prompt=None, source_state=None) -> dict:
        return {
            **self.run_columns(e, method, s, ids, pos, t),
            "relation": e["relation"],
            "subject": e["subject"],
            "object": e["object"],
            "source_text": e["source_text"],
            "target_prompt": target_prompt or e["target_prompt"],
            "generation": generation,
            "correct": correct if correct is None else bool(correct),
            "filled_generation": e["filled_generation"],
            "filled_correct": bool(e["filled_correct"]),
            "source_subject": e["subject"],
            "stop_when_correct": self.stop_when_correct,
            "source_state": EMPTY_STATE if source_state is None else source_state,
        }

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        """Table 2 (mean ± std over source blocks, t-test, Bonferroni, the paper's columns, the
        controls), Figure 6's curves per task, and the (ℓ, ℓ*) heatmap."""
        patch = df[df["method"] == "patchscope"]
        probe = probe_predictions(df, int(cfg.probe.folds), int(cfg.runner.seed))
        table_cfg = cfg.get("table") or {}
        paper = read_paper_table(table_cfg.get("paper"))
        thresholds = dict(table_cfg.get("significance") or {"**": 1e-5, "*": 1e-4})
        tasks = attribute_table(df, probe, paper, thresholds)
        curves = []
        for method, rows in (("patchscope", patch), ("shuffled_source", df[df["method"] == "shuffled_source"])):
            scored = any_target_block(rows, ["relation", "example_id", "source_layer"]) if len(rows) else rows
            for (rel, layer), v in (
                scored.groupby(["relation", "source_layer"])["correct"].mean().items() if len(rows) else []
            ):
                curves.append({"task": rel, "method": method, "source_layer": int(layer), "accuracy": float(v)})
        for (rel, layer), v in probe.groupby(["relation", "source_layer"])["correct"].mean().items():
            curves.append({"task": rel, "method": "linear_probe", "source_layer": int(layer), "accuracy": float(v)})
        heat = patch.groupby(["source_layer", "target_layer"])["correct"].mean().reset_index()
        return {
            "experiment": "attribute_extraction",
            "n_examples": int(df["example_id"].nunique()),
            "placeholder_text": (cfg.patchscope.get("placeholder_text") or cfg.patchscope.placeholder),
            "scale": float(cfg.patchscope.get("scale", 1.0) or 1.0),
            "tasks": tasks,
            "heatmap": heat.to_dict("records"),
            "by_layer": curves,
        }

    @staticmethod
    def report(metrics: dict) -> str:
        return (
            "attribute extraction (Table 2's way): accuracy in %, mean ± std over source blocks ℓ (per ℓ a sample "
            "counts if some ℓ* gives the object); probe = logistic regression per block, 3-fold CV; t, p_bonf = "
            "paired t-test over blocks, Bonferroni over tasks; n = samples patched / samples (the filter); paper_* "
            "from the paper's Table 2 (GPT-J 6B); controls on the same samples; gain = patchscope - source_in_prompt "
            "(points); ! = the Patchscope does not beat shuffled_source, embedding_only, zero, mean and "
            "source_in_prompt (those that ran)\n" + format_table(metrics["tasks"])
        )

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import heatmap
        from patchscan.plots.tasks import task_panels

        out = []
        if metrics["heatmap"]:
            heat = pd.DataFrame(metrics["heatmap"]).pivot(
                index="source_layer", columns="target_layer", values="correct"
            )
            out.append(
                heatmap(
                    heat,
                    run_dir / "attribute_heatmap.png",
                    "Attribute extraction accuracy by (ℓ, ℓ*)",
                    "target block ℓ*",
                    "source block ℓ",
                )
            )
        if metrics["by_layer"]:
            title = "Attribute extraction by source block (Figure 6): Patchscope (any ℓ*), probe, shuffled source"
            out.append(task_panels(pd.DataFrame(metrics["by_layer"]), run_dir / "attribute_by_layer.png", title))
        return out
