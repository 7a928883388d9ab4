"""Superscopes (Jacobi & Niv 2025): do amplified states read out where plain ones do not?

As the paper's evaluation notebook runs it: the entity name alone is the source prompt; its last
token's state at a site of block ℓ (`mlp_out`, `mlp_in`, `resid_post`), times α, is written into the
block output at the final "x" of the entity-description prompt at ℓ* = ℓ (or 0); 10 greedy tokens
are scored by MiniLM cosine to the entity name. A (name, site, block) succeeds at α = 1 (the plain
patch, Patchscopes) or, with auto-α, when some α ≠ 1 gives similarity above the threshold.

`controls` (experiments.controls), scored the same way: `zero` (a zero vector at each site × block,
which no α changes), `mean` (the mean state of the site and block over all names, times each α, with
its own auto-α: does amplifying any state of the site read as well?) and `source_in_prompt` (the name,
then the description prompt without its placeholder, unpatched: the name read as text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from patchscan.data.texts import load_texts, read_lines
from patchscan.engine import Patch, Scale
from patchscan.errors import UserError
from patchscan.experiments import controls
from patchscan.experiments.base import Experiment
from patchscan.experiments.prompts import span_last_token
from patchscan.grids import layer_pairs
from patchscan.metrics.stats import grouped_mean_se
from patchscan.models.families import SITES

__all__ = ["SuperscopesExperiment", "choose_alpha"]

CELL = ["source_site", "source_layer", "target_layer"]  # one success per entity in each
AMPLIFIED = ("superscopes", "mean")  # the methods run at every α (auto-α picks among their α ≠ 1)


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
        isinstance(a, int | float) and not isinstance(a, bool) and 0 < a < math.inf for a in value
    )
    if not numbers or not value:
        raise UserError(
            f"superscopes.alphas={_shown(value)} is not valid; use a list of finite numbers > 0 with 1 in it"
        )
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
    per (method, entity, site, block, target block); the first such α on a tie."""
    amplified = df[(df["alpha"] != 1) & df["method"].isin(AMPLIFIED)]
    picked = amplified.groupby(["method", "example_id", *CELL])["similarity"].idxmax()
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
        self.controls = controls.check(cfg, "superscopes")
        self.nulls = controls.NullStates()
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
        self.set_target_prompt(self.cfg.patchscope.target_prompt)

    def examples(self) -> list[dict]:
        """One example per entity name: the name alone, read at its last token."""
        out = []
        for i, name in enumerate(self.limited(self.entities)):
            ids, last = span_last_token(self.view, name, name)
            out.append({"example_id": str(i), "name": name, "ids": ids[: last + 1], "position": last})
        if "mean" in self.controls:  # over every name, at each site, before shards split them
            sources = {site: [(e["ids"], e["position"]) for e in out] for site in self.sites}
            sites = {site: site for site in self.sites}
            self.nulls = controls.NullStates.capture(self, self.view, sources, self.source_layers, sites)
        return out

    def _cells(self, examples: list[dict]) -> list[tuple]:
        """(example index, method, site, source block, target block, α), in the order of the patches:
        the amplified grid, then its null patches (`zero` once, α being moot; `mean` at every α), then
        `source_in_prompt` (site, blocks and α None)."""
        cells = []
        for k in range(len(examples)):
            for site in self.sites:
                for s, t in self.pairs:
                    cells += [(k, "superscopes", site, s, t, alpha) for alpha in self.alphas]
                    if "zero" in self.controls:
                        cells.append((k, "zero", site, s, t, 1.0))
                    if "mean" in self.controls:
                        cells += [(k, "mean", site, s, t, alpha) for alpha in self.alphas]
            if "source_in_prompt" in self.controls:
                cells.append((k, "source_in_prompt", None, None, None, None))
        return cells

    def _patch(self, examples: list[dict], caps: dict, k: int, method: str, site, s, t, alpha) -> Patch:
        if method == "source_in_prompt":
            text = controls.source_in_prompt(self.cfg, examples[k]["name"], self.prompt)
            ids = tuple(self.target_view.encode(text))
            return Patch(target_ids=ids, target_position=len(ids) - 1, target_layer=0, vector=None)
        state = caps[site][k].at(s)
        if method != "superscopes":
            state = self.nulls.vector(method, state, site, s)
        return Patch(
            target_ids=tuple(self.target_ids),
            target_position=self.target_position,
            target_layer=t,
            vector=Scale(alpha)(state),
            target_site=self.target_site,
        )

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        from patchscan.metrics.similarity import embedding_cosine

        caps = {site: self.capture_sources(examples, site=site) for site in self.sites}  # one capture a site
        cells = self._cells(examples)
        patches = [self._patch(examples, caps, *cell) for cell in cells]
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
        rows = []
        for (k, method, site, s, t, alpha), patch, text, sim in zip(cells, patches, texts, similarity):
            ids, position = patch.target_ids, patch.target_position
            name = examples[k]["name"]
            prompt = controls.source_in_prompt(self.cfg, name, self.prompt) if site is None else self.prompt
            rows.append(
                {
                    **self.run_columns(examples[k], method, s, ids, position, t, source_site=site),
                    "subject": name,
                    "object": name,  # the reference the generation is scored against: the name itself
                    "source_text": name,
                    "target_prompt": prompt,
                    "alpha": alpha,
                    "generation": text,
                    "similarity": sim,
                    "stop_when_correct": False,
                }
            )
        df = self.frame(rows)
        df["auto_alpha_chosen"] = choose_alpha(df)
        return df

    # ------------------------------------------------------------------ metrics, report, plot

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        """Per site and block, the share of entities that succeed: auto-α and α = 1, and beside them
        the null patches (`zero`; `mean` at α = 1 and with its own auto-α); `source_in_prompt` overall."""
        block = cfg.get("superscopes") or {}
        threshold = float(block.get("threshold", 0.3))
        df = df.assign(success=df["similarity"] > threshold)
        key = [*CELL, "example_id"]

        def per_entity(method: str, prefix: str = "") -> pd.DataFrame:
            rows = df[df["method"] == method]
            out = {f"{prefix}alpha_1": rows[rows["alpha"] == 1].groupby(key)["success"].any()}
            if method in AMPLIFIED:
                out[f"{prefix}auto_alpha"] = rows[rows["alpha"] != 1].groupby(key)["similarity"].max() > threshold
            return pd.DataFrame(out)

        parts = [per_entity("superscopes")]
        columns = ["auto_alpha", "alpha_1"]
        if (df["method"] == "mean").any():
            parts.append(per_entity("mean", "mean_"))
            columns += ["mean_auto_alpha", "mean_alpha_1"]
        if (df["method"] == "zero").any():
            parts.append(per_entity("zero", "zero_").rename(columns={"zero_alpha_1": "zero"}))
            columns.append("zero")
        per = pd.concat(parts, axis=1).reset_index()
        picked = df[df["auto_alpha_chosen"] & (df["method"] == "superscopes")]
        chosen = picked.groupby(CELL)["alpha"].mean().rename("mean_chosen_alpha")
        success = pd.DataFrame(grouped_mean_se(per, CELL, columns))
        success = success.merge(chosen.reset_index(), on=CELL, how="left")
        plain = df[df["method"] == "source_in_prompt"]
        return {
            "experiment": cfg.experiment.name,
            "n_examples": int(df["example_id"].nunique()),
            "threshold": threshold,
            "auto_alpha": bool(block.get("auto_alpha", True)),
            "success": success.to_dict("records"),  # per site and block: share of entities, auto-α, α = 1, nulls
            "source_in_prompt": float(plain["success"].mean()) if len(plain) else None,
            "by_alpha": grouped_mean_se(
                df[df["method"].isin(AMPLIFIED)], ["method", *CELL, "alpha"], ["success", "similarity"]
            ),
        }

    @staticmethod
    def _lines(metrics: dict, kinds=(("auto_alpha", "auto α"), ("alpha_1", "α=1"))) -> pd.DataFrame:
        """Success rate per (site, kind, source block, target block): `kinds` (columns of `success` and
        their labels; those absent are left out), or each α's own without auto-α."""
        if metrics["auto_alpha"]:
            by = pd.DataFrame(metrics["success"])
            parts = [
                by.assign(kind=label, rate=by[column], rate_se=by[f"{column}_se"])
                for column, label in kinds
                if column in by
            ]
            return pd.concat(parts, ignore_index=True).sort_values("source_site", kind="stable")
        by = pd.DataFrame(metrics["by_alpha"])
        by = by[by["method"] == "superscopes"]
        kind = "α=" + by["alpha"].map(lambda a: f"{a:g}")
        return by.assign(kind=kind, rate=by["success"], rate_se=by["success_se"])

    @staticmethod
    def _table(lines: pd.DataFrame) -> str:
        lines = lines.assign(line=lines["source_site"] + " " + lines["kind"])
        table = lines.pivot_table(index=["source_layer", "target_layer"], columns="line", values="rate", sort=False)
        return table.to_string(float_format=lambda x: f"{x:.3f}")

    @staticmethod
    def report(metrics: dict) -> str:
        out = (
            f"superscopes: share of {metrics['n_examples']} entities whose generation has MiniLM cosine > "
            f"{metrics['threshold']:g} to the name, by site and block\n"
            + SuperscopesExperiment._table(SuperscopesExperiment._lines(metrics))
        )
        nulls = (("zero", "zero"), ("mean_alpha_1", "mean α=1"), ("mean_auto_alpha", "mean auto α"))
        if metrics["auto_alpha"] and any(c in metrics["success"][0] for c, _ in nulls):
            out += (
                "\nnull patches (the same grid with a zero vector, or the site and block's mean state over all names)\n"
            )
            out += SuperscopesExperiment._table(SuperscopesExperiment._lines(metrics, nulls))
        if metrics.get("source_in_prompt") is not None:
            out += (
                f"\nsource_in_prompt (the name, then the prompt without x; no patch): {metrics['source_in_prompt']:.3f}"
            )
        return out

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import styled_curves

        return [
            styled_curves(
                SuperscopesExperiment._lines(
                    metrics, (("auto_alpha", "auto α"), ("alpha_1", "α=1"), ("mean_auto_alpha", "mean state, auto α"))
                ),
                "rate",
                f"share of entities with MiniLM cosine > {metrics['threshold']:g}",
                run_dir / "superscopes_success.png",
                color="source_site",
                style="kind",
                title=f"Superscopes: amplified states read at the entity prompt ({metrics['n_examples']} entities)",
            )
        ]
