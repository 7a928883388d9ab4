"""Entity resolution (paper §4.3): what does the model know about an entity, block by block?

The state of the entity name's last token at block ℓ is patched at the final "x" of a few-shot
description prompt at block ℓ* = ℓ, and the greedy continuation (50 tokens) is compared with a
reference description by Rouge-L and by sentence-embedding cosine similarity. `controls`
(experiments.controls): `source_in_prompt` (the entity's name, then the description prompt without
its placeholder, unpatched, on the target model: cross_model's verbalizer), `zero` and `mean`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from patchscan.api.lenses import AffineMaps
from patchscan.data.entities import load_entities
from patchscan.engine import Patch, Scale
from patchscan.experiments import controls
from patchscan.experiments.base import Experiment
from patchscan.experiments.prompts import span_last_token
from patchscan.metrics.answers import StopAfterDescription, first_description
from patchscan.metrics.stats import grouped_mean_se

__all__ = ["EntityExperiment", "first_description", "score_descriptions"]


def score_descriptions(df: pd.DataFrame, embedding: bool = True, embed_texts=None) -> pd.DataFrame:
    """Add rouge_l (and embedding_cosine) columns comparing `description` with `object`; the sentence
    embeddings by `embed_texts` (default MiniLM's, `metrics.similarity.embed`)."""
    from patchscan.metrics.similarity import embedding_cosine, rouge_l

    df = df.copy()
    df["rouge_l"] = rouge_l(df["description"].tolist(), df["object"].tolist())
    if embedding:
        df["embedding_cosine"] = embedding_cosine(df["description"].tolist(), df["object"].tolist(), embed_texts)
    return df


def control_means(df: pd.DataFrame, columns: list[str]) -> list[dict]:
    """Per method (the Patchscope, then each control that ran): the mean of each score over its rows,
    its best (ℓ, ℓ*) cell, and the gain over `source_in_prompt` (the source text given as text)."""
    out = []
    for method in ("patchscope", *(m for m in controls.SHARED if m != "source_in_prompt"), "source_in_prompt"):
        rows = df[df["method"] == method]
        if rows.empty:
            continue
        record = {"method": method}
        for c in columns:
            record[c] = float(rows[c].mean())
            cells = rows.groupby(["source_layer", "target_layer"])[c].mean()
            record[f"{c}_best"] = float(cells.max()) if len(cells) else float("nan")
        out.append(record)
    plain = next((r for r in out if r["method"] == "source_in_prompt"), None)
    for record in out:
        for c in columns:
            record[f"{c}_gain"] = record[c] - plain[c] if plain else float("nan")
    return out


class EntityExperiment(Experiment):
    """Entity descriptions; with `maps` (cross-model patching) each state is mapped into the target
    model's block before it is patched."""

    name = "entity_resolution"
    position_specs = ("last", "random", "all", "list")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.controls = controls.check(cfg, str(cfg.experiment.name))
        self.nulls = controls.NullStates()
        self.entities = load_entities(cfg.dataset.get("path"))

    def bind(self, view, target_view=None, maps: AffineMaps | None = None) -> None:
        super().bind(view, target_view)
        self.maps = maps
        self.set_layer_pairs()
        self.set_target_prompt(self.cfg.patchscope.target_prompt)

    def examples(self) -> list[dict]:
        """One example per entity and source position (`sweep.source_positions` among the name's
        tokens; the default, `last`, is the name's last token as in the paper)."""
        out = []
        for i, entity in enumerate(self.limited(self.entities)):
            ids, last = span_last_token(self.view, entity["name"], entity["name"])
            positions = self.source_positions(last + 1, i)
            for position in positions:
                example_id = str(i) if len(positions) == 1 else f"{i}@{position}"
                out.append({"example_id": example_id, **entity, "ids": ids[: position + 1], "position": position})
        if "mean" in self.controls:  # over every example (the model M's states), before shards split them
            sources = {"name": [(e["ids"], e["position"]) for e in out]}
            self.nulls = controls.NullStates.capture(self, self.view, sources, self.source_layers)
        return out

    def map_state(self, state, source_layer: int, target_layer: int):
        """Identity within one model, mapped by the fitted affine map between two models; then times
        `patchscope.scale` (1.0; Superscopes' amplification)."""
        state = state if self.maps is None else self.maps.apply(state, source_layer, target_layer)
        return Scale(self.cfg.patchscope.get("scale") or 1.0)(state)

    def _row(self, e: dict, method: str, source_layer, target_layer, text: str, target=None) -> dict:
        prompt, ids, position = target or (self.prompt, self.target_ids, self.target_position)
        return {
            **self.run_columns(e, method, source_layer, ids, position, target_layer),
            "subject": e["name"],
            "object": e["description"],
            "popularity": e["popularity"],
            "source_text": e["name"],
            "target_prompt": prompt,
            "generation": text,
            "description": first_description(text),
        }

    def _cells(self, examples: list[dict], caps: list) -> tuple[list[Patch], list[tuple]]:
        """The patched grid, its null patches (`zero`, `mean`) and the unpatched `source_in_prompt`
        runs (on the target model, which verbalizes), with what each row needs (`cells`)."""
        patches, cells = [], []
        nulls = [c for c in self.controls if c in controls.NULL_PATCHES]
        for e, cap in zip(examples, caps):
            for s, t in self.pairs:
                state = self.map_state(cap.at(s), s, t)
                for method in ("patchscope", *nulls):
                    vector = state
                    if method == "zero":  # zeros where M*'s state goes (not the map's bias)
                        vector = torch.zeros_like(state)
                    elif method == "mean":  # the mean source state, mapped and scaled like the states
                        vector = self.map_state(self.nulls.vector(method, cap.at(s), "name", s), s, t)
                    patches.append(
                        Patch(
                            target_ids=tuple(self.target_ids),
                            target_position=self.target_position,
                            target_layer=t,
                            vector=vector,
                            target_site=self.target_site,
                        )
                    )
                    cells.append((e, method, s, t, None))
            if "source_in_prompt" in self.controls:
                text = controls.source_in_prompt(self.cfg, e["name"], self.prompt)
                ids = self.target_view.encode(text)
                patches.append(Patch(target_ids=tuple(ids), target_position=len(ids) - 1, target_layer=0, vector=None))
                cells.append((e, "source_in_prompt", None, None, (text, ids, len(ids) - 1)))
        return patches, cells

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        caps = self.capture_sources(examples)
        patches, cells = self._cells(examples, caps)
        stop = self.stop_when_correct  # stop once the description is decided
        gens = self.engine.generate(
            self.target_view,
            patches,
            max_new_tokens=int(self.cfg.generation.max_new_tokens),
            progress=progress,
            stops=[StopAfterDescription() if stop else None] * len(patches),
            **self.generating(),
        )
        texts = [self.target_view.decode(g) for g in gens]
        rows = [
            self._row(e, m, s, t, text, target) | {"stop_when_correct": stop}
            for (e, m, s, t, target), text in zip(cells, texts)
        ]
        embedding = bool(self.cfg.similarity.embedding)
        return score_descriptions(self.frame(rows), embedding, self.engine.embed_texts)

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        columns = ["rouge_l"] + (["embedding_cosine"] if "embedding_cosine" in df else [])
        patch = df[df["method"] == "patchscope"]
        return {
            "experiment": cfg.experiment.name,
            "n_examples": int(df["example_id"].nunique()),
            "by_layer": grouped_mean_se(patch, ["popularity", "source_layer", "target_layer"], columns),
            "by_layer_all": grouped_mean_se(patch, ["source_layer", "target_layer"], columns),
            "counts": df.drop_duplicates("example_id")["popularity"].value_counts().to_dict(),
            "controls": control_means(df, columns),
        }

    @staticmethod
    def report(metrics: dict) -> str:
        by = pd.DataFrame(metrics["by_layer"])
        values = [c for c in ("rouge_l", "embedding_cosine") if c in by]
        table = by.pivot_table(index=["source_layer", "target_layer"], columns="popularity", values=values)
        table.columns = [f"{v} {p}" for v, p in table.columns]
        beside = ""
        if len(metrics.get("controls") or []) > 1:
            beside = (
                "\nthe Patchscope beside its controls (mean over every row; best = the best (ℓ, ℓ*) cell; gain = "
                "minus source_in_prompt, on the same entities)\n"
                + pd.DataFrame(metrics["controls"])
                .set_index("method")
                .to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
            )
        return (
            f"entity description similarity by block ({metrics['n_examples']} entities: {metrics['counts']})\n"
            + table.to_string(float_format=lambda x: f"{x:.3f}")
            + beside
        )

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import method_curves

        by = pd.DataFrame(metrics["by_layer"])
        columns = [c for c in ("rouge_l", "embedding_cosine") if c in by]
        labels = {"rouge_l": "Rouge-L F1", "embedding_cosine": "MiniLM cosine"}
        return [
            method_curves(
                by,
                columns,
                [labels[c] for c in columns],
                run_dir / "entity_similarity.png",
                title=f"Entity descriptions from block ℓ ({metrics['n_examples']} entities)",
                line_column="popularity",
            )
        ]
