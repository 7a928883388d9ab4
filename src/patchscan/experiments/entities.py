"""Entity resolution (paper §4.3): what does the model know about an entity, block by block?

The state of the entity name's last token at block ℓ is patched at the final "x" of a few-shot
description prompt at block ℓ* = ℓ, and the greedy continuation (50 tokens) is compared with a
reference description by Rouge-L and by sentence-embedding cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from patchscan.api.lenses import AffineMaps
from patchscan.data.entities import load_entities
from patchscan.engine import Patch, Scale
from patchscan.experiments.base import Experiment
from patchscan.experiments.prompts import placeholder_position, span_last_token
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


class EntityExperiment(Experiment):
    """Entity descriptions; with `maps` (cross-model patching) each state is mapped into the target
    model's block before it is patched."""

    name = "entity_resolution"
    position_specs = ("last", "random", "all", "list")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.entities = load_entities(cfg.dataset.get("path"))

    def bind(self, view, target_view=None, maps: AffineMaps | None = None) -> None:
        super().bind(view, target_view)
        self.maps = maps
        self.set_layer_pairs()
        self.prompt = self.cfg.patchscope.target_prompt
        self.target_ids, self.target_position = placeholder_position(
            self.target_view,
            self.prompt,
            self.cfg.patchscope.placeholder,
            self.cfg.patchscope.get("placeholder_occurrence"),
        )

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
        return out

    def map_state(self, state, source_layer: int, target_layer: int):
        """Identity within one model, mapped by the fitted affine map between two models; then times
        `patchscope.scale` (1.0; Superscopes' amplification)."""
        state = state if self.maps is None else self.maps.apply(state, source_layer, target_layer)
        return Scale(self.cfg.patchscope.get("scale") or 1.0)(state)

    def _row(self, e: dict, source_layer: int, target_layer: int, text: str) -> dict:
        return {
            **self.run_columns(e, "patchscope", source_layer, self.target_ids, self.target_position, target_layer),
            "subject": e["name"],
            "object": e["description"],
            "popularity": e["popularity"],
            "source_text": e["name"],
            "target_prompt": self.prompt,
            "generation": text,
            "description": first_description(text),
        }

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        caps = self.capture_sources(examples)
        patches = [
            Patch(
                target_ids=tuple(self.target_ids),
                target_position=self.target_position,
                target_layer=t,
                vector=self.map_state(cap.at(s), s, t),
                target_site=self.target_site,
            )
            for cap in caps
            for s, t in self.pairs
        ]
        stop = self.stop_when_correct  # stop once the description is decided
        gens = self.engine.generate(
            self.target_view,
            patches,
            max_new_tokens=int(self.cfg.generation.max_new_tokens),
            progress=progress,
            stops=[StopAfterDescription() if stop else None] * len(patches),
            **self.generating(),
        )
        texts = iter(self.target_view.decode(g) for g in gens)
        rows = [self._row(e, s, t, next(texts)) | {"stop_when_correct": stop} for e in examples for s, t in self.pairs]
        embedding = bool(self.cfg.similarity.embedding)
        return score_descriptions(self.frame(rows), embedding, self.engine.embed_texts)

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        columns = ["rouge_l"] + (["embedding_cosine"] if "embedding_cosine" in df else [])
        return {
            "experiment": cfg.experiment.name,
            "n_examples": int(df["example_id"].nunique()),
            "by_layer": grouped_mean_se(df, ["popularity", "source_layer", "target_layer"], columns),
            "by_layer_all": grouped_mean_se(df, ["source_layer", "target_layer"], columns),
            "counts": df.drop_duplicates("example_id")["popularity"].value_counts().to_dict(),
        }

    @staticmethod
    def report(metrics: dict) -> str:
        by = pd.DataFrame(metrics["by_layer"])
        values = [c for c in ("rouge_l", "embedding_cosine") if c in by]
        table = by.pivot_table(index=["source_layer", "target_layer"], columns="popularity", values=values)
        table.columns = [f"{v} {p}" for v, p in table.columns]
        return (
            f"entity description similarity by block ({metrics['n_examples']} entities: {metrics['counts']})\n"
            + table.to_string(float_format=lambda x: f"{x:.3f}")
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
