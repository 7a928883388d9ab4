"""Entity resolution (paper §4.3): what does the model know about an entity, block by block?

The state of the entity name's last token at block ℓ is patched at the final "x" of a few-shot
description prompt at block ℓ* = ℓ, and the greedy continuation (50 tokens) is compared with a
reference description by Rouge-L and by sentence-embedding cosine similarity.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from patchscan.data.entities import load_entities
from patchscan.engine import Patch, Scale
from patchscan.metrics.stats import grouped_mean_se
from patchscan.prompts import placeholder_position, span_last_token
from patchscan.scopes.base import Scope
from patchscan.sweep import layer_pairs

_NEXT_ITEM = re.compile(r",\s*[A-Z][^,:]{0,60}:")


def first_description(generation: str) -> str:
    """The description the model wrote for x: up to the next line or the next 'Name:' item."""
    text = generation.split("\n")[0].lstrip(" :")
    match = _NEXT_ITEM.search(text)
    return (text[: match.start()] if match else text).strip()


def score_descriptions(df: pd.DataFrame, embedding: bool = True) -> pd.DataFrame:
    """Add rouge_l (and embedding_cosine) columns comparing `description` with `object`."""
    from patchscan.metrics.similarity import embedding_cosine, rouge_l

    df = df.copy()
    df["rouge_l"] = rouge_l(df["description"].tolist(), df["object"].tolist())
    if embedding:
        df["embedding_cosine"] = embedding_cosine(df["description"].tolist(), df["object"].tolist())
    return df


class EntityScope(Scope):
    name = "entity_resolution"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.entities = load_entities(cfg.dataset.get("path"))

    def bind(self, view, target_view=None) -> None:
        super().bind(view)
        self.target_view = target_view or view
        self.pairs = layer_pairs(
            self.cfg.sweep.source_layers, self.cfg.sweep.target_layers, view.n_blocks, self.target_view.n_blocks
        )
        self.source_layers = sorted({s for s, _ in self.pairs})
        self.prompt = self.cfg.patchscope.target_prompt
        self.target_ids, self.target_position = placeholder_position(
            self.target_view, self.prompt, self.cfg.patchscope.placeholder
        )

    def examples(self) -> list[dict]:
        out = []
        for i, entity in enumerate(self.entities):
            ids, position = span_last_token(self.view, entity["name"], entity["name"])
            out.append({"example_id": str(i), **entity, "ids": ids[: position + 1], "position": position})
        limit = self.cfg.dataset.get("limit")
        return out[: int(limit)] if limit else out

    def map_state(self, state, source_layer: int, target_layer: int):
        """Identity within one model, times `patchscope.scale` (1.0; Superscopes' amplification);
        cross-model patching maps the state first."""
        return Scale(self.cfg.patchscope.get("scale") or 1.0)(state)

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        caps = self.engine.capture(
            self.view,
            [e["ids"] for e in examples],
            self.source_layers,
            [[e["position"]] for e in examples],
            batch_size=self.capture_batch_size(),
        )
        patches = [
            Patch(
                target_ids=tuple(self.target_ids),
                target_position=self.target_position,
                target_layer=t,
                vector=self.map_state(cap.at(s), s, t),
            )
            for cap in caps
            for s, t in self.pairs
        ]
        gens = self.engine.generate(
            self.target_view,
            patches,
            max_new_tokens=int(self.cfg.generation.max_new_tokens),
            progress=progress,
            **self.batching(),
        )
        rows, k = [], 0
        for e in examples:
            for s, t in self.pairs:
                text = self.target_view.decode(gens[k])
                k += 1
                rows.append(
                    {
                        "example_id": e["example_id"],
                        "method": "patchscope",
                        "model": self.view.name,
                        "target_model": self.target_view.name,
                        "subject": e["name"],
                        "object": e["description"],
                        "popularity": e["popularity"],
                        "source_text": e["name"],
                        "source_token_ids": e["ids"],
                        "source_position": e["position"],
                        "source_layer": s,
                        "target_prompt": self.prompt,
                        "target_token_ids": list(self.target_ids),
                        "target_position": self.target_position,
                        "target_layer": t,
                        "generation": text,
                        "description": first_description(text),
                    }
                )
        if self.planning:  # a dry run loads no model, the embedding model included
            return pd.DataFrame(rows)
        return score_descriptions(pd.DataFrame(rows), bool(self.cfg.similarity.embedding))

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
