"""Superscopes (Jacobi & Niv 2025): do amplified states read out where plain ones do not?

As the paper's evaluation notebook runs it: the entity name alone is the source prompt; its last
token's state at a site of block ℓ (`mlp_out`, `mlp_in`, `resid_post`), times α, is written into the
block output at the final "x" of the entity-description prompt at ℓ* = ℓ (or 0); 10 greedy tokens
are scored by MiniLM cosine to the entity name. A (name, site, block) succeeds at α = 1 (the plain
patch, Patchscopes) or, with auto-α, when some α ≠ 1 gives similarity above the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from patchscan.data.texts import load_texts, read_lines
from patchscan.engine import Patch, Scale
from patchscan.errors import UserError
from patchscan.experiments.base import Experiment
from patchscan.experiments.prompts import placeholder_position, span_last_token
from patchscan.grids import layer_pairs
from patchscan.metrics.stats import grouped_mean_se
from patchscan.models.families import SITES

__all__ = ["SuperscopesExperiment", "choose_alpha"]

CELL = ["source_site", "source_layer", "target_layer"]  # one success per entity in each


def _shown(value) -> str:
    value = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    return repr(value) if isinstance(value, str) else str(value)


def _sites(value) -> list[str]:
    if not isinstance(value, ListConfig | list) or not value:
        raise UserError(f"superscopes.sites={_shown(value)} is not valid; use a non-empty list of {', '.join(SITES)}")
    for site in value:
        if site not in SITES:
            raise UserError(f"superscopes.sites: unknown site {site!r}; sites: {', '.join(SITES)}")
    if len(set(value)) != len(value):
        raise UserError(f"superscopes.sites={_shown(value)} names a site twice; name each once")
    return [str(s) for s in value]


def _alphas(value) -> list[float]:
    numbers = isinstance(value, ListConfig | list) and all(
        isinstance(a, int | float) and not isinstance(a, bool) and a > 0 for a in value
    )
    if not numbers or not value:
        raise UserError(f"superscopes.alphas={_shown(value)} is not valid; use a list of numbers > 0 with 1 in it")
    if 1 not in value:
        raise UserError(f"superscopes.alphas={_shown(value)} has no 1; α = 1, the plain patch, is the baseline: add it")
    if len(set(value)) != len(value) or len(value) < 2:
        raise UserError(f"superscopes.alphas={_shown(value)}: name each α once, and at least one besides 1")
    return [float(a) for a in value]


def _target_layer(value) -> str:
    if isinstance(value, str) and value.strip().lower() == "same":
        return "same"
    if (value == 0 and not isinstance(value, bool)) or value == "0":
        return "0"
    raise UserError(f"superscopes.target_layer={_shown(value)} is not valid; use same (ℓ* = ℓ) or 0 (the first block)")


def choose_alpha(df: pd.DataFrame) -> pd.Series:
    """Auto-α: True on the row of the α ≠ 1 whose generation is most similar to the entity name, one
    per (entity, site, block, target block); the first such α on a tie."""
    amplified = df[df["alpha"] != 1]
    picked = amplified.groupby(["example_id", *CELL])["similarity"].idxmax()
    return pd.Series(df.index.isin(picked.to_numpy()), index=df.index)


class SuperscopesExperiment(Experiment):
    """Amplified patches of several sites into the entity-description prompt, scored against the name."""

    name = "superscopes"
    position_specs = ("last",)

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        block = cfg.get("superscopes") or {}
        self.sites = _sites(block.get("sites"))
        self.alphas = _alphas(block.get("alphas"))
        self.target_layer = _target_layer(block.get("target_layer", "same"))
        self.refuse_replaced_keys()
        path = cfg.dataset.get("path")
        self.entities = read_lines(path, "entity file") if path else load_texts(cfg.dataset)

    def refuse_replaced_keys(self) -> None:
        """The shared keys that `superscopes:` replaces: set otherwise, they would be ignored in silence."""
        sweep, patchscope = self.cfg.sweep, self.cfg.get("patchscope") or {}
        if str(sweep.get("target_layers", "same")).strip().lower() != "same":
            raise UserError(
                f"sweep.target_layers={_shown(sweep.target_layers)} does not apply to superscopes; "
                "use superscopes.target_layer=same or 0"
            )
        if self.source_site != "resid_post":
            raise UserError(
                f"patchscope.source_site={self.source_site!r} does not apply to superscopes; use superscopes.sites"
            )
        scale = patchscope.get("scale") or 1.0
        if float(scale) != 1.0:
            raise UserError(f"patchscope.scale={scale} does not apply to superscopes; use superscopes.alphas")

    def bind(self, view, target_view=None) -> None:
        super().bind(view, target_view)
        for site in self.sites:
            self.view.site(site)  # a site this family lacks is refused here, in one line
        self.target_view.site(self.target_site)
        target = "same" if self.target_layer == "same" else [0]
        sweep = self.cfg.sweep
        self.pairs = layer_pairs(sweep.source_layers, target, self.view.n_blocks, self.target_view.n_blocks)
        self.source_layers = sorted({s for s, _ in self.pairs})
        self.prompt = self.cfg.patchscope.target_prompt
        self.target_ids, self.target_position = placeholder_position(
            self.target_view,
            self.prompt,
            self.cfg.patchscope.placeholder,
            self.cfg.patchscope.get("placeholder_occurrence"),
        )

    def examples(self) -> list[dict]:
        """One example per entity name: the name alone, read at its last token."""
        out = []
        for i, name in enumerate(self.limited(self.entities)):
            ids, last = span_last_token(self.view, name, name)
            out.append({"example_id": str(i), "name": name, "ids": ids[: last + 1], "position": last})
        return out

    def _cells(self, examples: list[dict]) -> list[tuple]:
        """(example index, site, source block, target block, α), in the order of the patches."""
        return [
            (k, site, s, t, alpha)
            for k in range(len(examples))
            for site in self.sites
            for s, t in self.pairs
            for alpha in self.alphas
        ]

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        from patchscan.metrics.similarity import embedding_cosine

        caps = {site: self.capture_sources(examples, site=site) for site in self.sites}  # one capture a site
        cells = self._cells(examples)
        patches = [
            Patch(
                target_ids=tuple(self.target_ids),
                target_position=self.target_position,
                target_layer=t,
                vector=Scale(alpha)(caps[site][k].at(s)),
                target_site=self.target_site,
            )
            for k, site, s, t, alpha in cells
        ]
        gens = self.engine.generate(  # one call: the engine batches the rows and shares the target prompt
            self.target_view,
            patches,
            max_new_tokens=int(self.cfg.generation.max_new_tokens),
            progress=progress,
            **self.generating(),
        )
        texts = [self.target_view.decode(g) for g in gens]
        names = [examples[k]["name"] for k, *_ in cells]
        similarity = embedding_cosine(texts, names, self.engine.embed_texts)
        rows = [
            {
                **self.run_columns(
                    examples[k], "superscopes", s, self.target_ids, self.target_position, t, source_site=site
                ),
                "subject": examples[k]["name"],
                "object": examples[k]["name"],  # the reference the generation is scored against: the name itself
                "source_text": examples[k]["name"],
                "target_prompt": self.prompt,
                "alpha": alpha,
                "generation": text,
                "similarity": sim,
                "stop_when_correct": False,
            }
            for (k, site, s, t, alpha), text, sim in zip(cells, texts, similarity)
        ]
        df = self.frame(rows)
        df["auto_alpha_chosen"] = choose_alpha(df)
        return df

    # ------------------------------------------------------------------ metrics, report, plot

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        block = cfg.get("superscopes") or {}
        threshold = float(block.get("threshold", 0.3))
        df = df.assign(success=df["similarity"] > threshold)
        key = [*CELL, "example_id"]
        per_entity = pd.DataFrame(
            {
                "alpha_1": df[df["alpha"] == 1].groupby(key)["success"].any(),
                "auto_alpha": df[df["alpha"] != 1].groupby(key)["similarity"].max() > threshold,
            }
        ).reset_index()
        chosen = df[df["auto_alpha_chosen"]].groupby(CELL)["alpha"].mean().rename("mean_chosen_alpha")
        success = pd.DataFrame(grouped_mean_se(per_entity, CELL, ["auto_alpha", "alpha_1"]))
        success = success.merge(chosen.reset_index(), on=CELL, how="left")
        return {
            "experiment": cfg.experiment.name,
            "n_examples": int(df["example_id"].nunique()),
            "threshold": threshold,
            "auto_alpha": bool(block.get("auto_alpha", True)),
            "success": success.to_dict("records"),  # per site and block: share of entities, auto-α and α = 1
            "by_alpha": grouped_mean_se(df, [*CELL, "alpha"], ["success", "similarity"]),
        }

    @staticmethod
    def _lines(metrics: dict) -> pd.DataFrame:
        """Success rate per (site, kind, source block, target block): kind auto α and α = 1, or each α."""
        if metrics["auto_alpha"]:
            by = pd.DataFrame(metrics["success"])
            parts = [
                by.assign(kind=label, rate=by[column], rate_se=by[f"{column}_se"])
                for column, label in (("auto_alpha", "auto α"), ("alpha_1", "α=1"))
            ]
            return pd.concat(parts, ignore_index=True).sort_values("source_site", kind="stable")
        by = pd.DataFrame(metrics["by_alpha"])
        kind = "α=" + by["alpha"].map(lambda a: f"{a:g}")
        return by.assign(kind=kind, rate=by["success"], rate_se=by["success_se"])

    @staticmethod
    def report(metrics: dict) -> str:
        lines = SuperscopesExperiment._lines(metrics)
        lines = lines.assign(line=lines["source_site"] + " " + lines["kind"])
        table = lines.pivot_table(index=["source_layer", "target_layer"], columns="line", values="rate", sort=False)
        return (
            f"superscopes: share of {metrics['n_examples']} entities whose generation has MiniLM cosine > "
            f"{metrics['threshold']:g} to the name, by site and block\n"
            + table.to_string(float_format=lambda x: f"{x:.3f}")
        )

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import styled_curves

        return [
            styled_curves(
                SuperscopesExperiment._lines(metrics),
                "rate",
                f"share of entities with MiniLM cosine > {metrics['threshold']:g}",
                run_dir / "superscopes_success.png",
                color="source_site",
                style="kind",
                title=f"Superscopes: amplified states read at the entity prompt ({metrics['n_examples']} entities)",
            )
        ]
