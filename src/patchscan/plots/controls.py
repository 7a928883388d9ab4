"""The comparisons `make fig-controls` draws from finished runs (their metrics.json and config only).

- controls.png: per task, the Patchscope's mean accuracy over source blocks beside its controls
  (shuffled_source, embedding_only, prompt_only, subject_in_prompt), from the run with the default
  placeholder and scale;
- placeholder.png: per task, the Patchscope's mean accuracy for each placeholder text (`x`, `?`, a
  random token, several tokens: the paper's "placeholder contamination");
- scale.png: accuracy (attribute runs) and description similarity (entity runs) against α, the
  factor the patched state is multiplied by (Superscopes' amplification);
- single_token.png: next-token precision@1 by source block, the few-shot identity prompt against the
  single-token prompt of the paper's appendix B.3 ([PAD] ... [PAD] + the token at its position).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from patchscan.errors import UserError  # noqa: E402

CONTROL_COLUMNS = ("patchscope_mean", "shuffled_source_mean", "embedding_only", "prompt_only", "subject_in_prompt")


def collect(root: Path) -> list[dict]:
    """Every finished run under `root`: experiment, placeholder text, scale, metrics."""
    runs = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        cfg_file = metrics_file.parent / ".hydra" / "config.yaml"
        if not cfg_file.is_file():
            continue
        cfg = OmegaConf.load(cfg_file)
        runs.append(
            {
                "dir": metrics_file.parent,
                "experiment": str(cfg.experiment.name),
                "placeholder": str(cfg.patchscope.get("placeholder_text") or cfg.patchscope.placeholder),
                "scale": float(cfg.patchscope.get("scale") or 1.0),
                "single_token": bool(cfg.patchscope.get("single_token_prompt")),
                "metrics": json.loads(metrics_file.read_text()),
            }
        )
    if not runs:
        raise UserError(f"no finished run (metrics.json with .hydra/config.yaml) under {root}")
    return runs


def _bars(table: pd.DataFrame, path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars: one group per row (task), one bar per column."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(table) * max(1, len(table.columns)) / 2), 4))
    width = 0.8 / max(1, len(table.columns))
    x = np.arange(len(table))
    for k, column in enumerate(table.columns):
        ax.bar(x + k * width, table[column].astype(float).fillna(0), width, label=str(column))
    ax.set_xticks(x + 0.4 - width / 2, table.index, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attribute_frame(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        if run["experiment"] == "attribute_extraction":
            for task in run["metrics"]["tasks"]:
                rows.append({"placeholder": run["placeholder"], "scale": run["scale"], **task})
    return pd.DataFrame(rows)


def draw(root: Path, default_placeholder: str = "x") -> list[Path]:
    """The three figures, from the runs under `root`, written into `root`."""
    runs = collect(root)
    attr = _attribute_frame(runs)
    out = []
    if len(attr):
        base = attr[(attr["placeholder"] == default_placeholder) & (attr["scale"] == 1.0)]
        if len(base):
            base = base.sort_values("shuffled_source_mean", na_position="last").drop_duplicates("task")
            table = base.set_index("task").sort_index()[list(CONTROL_COLUMNS)]
            out.append(_bars(table, root / "controls.png", "Patchscope (mean over ℓ) and its controls", "accuracy"))
        at_one = attr[attr["scale"] == 1.0]
        if at_one["placeholder"].nunique() > 1:
            table = at_one.pivot_table(index="task", columns="placeholder", values="patchscope_mean")
            out.append(_bars(table, root / "placeholder.png", "Patchscope accuracy by placeholder", "accuracy"))
    out += _scale_figure(runs, attr, root)
    out += _single_token_figure(runs, root)
    return out


def _single_token_figure(runs: list[dict], root: Path) -> list[Path]:
    lines = []
    for run in runs:
        if run["experiment"] != "next_token":
            continue
        by = pd.DataFrame(run["metrics"]["by_layer"])
        by = by[(by["method"] == "token_identity") & (by["source_layer"] == by["target_layer"])]
        label = "single-token prompt (B.3)" if run["single_token"] else "identity prompt"
        lines.append((label, by.sort_values("source_layer")))
    if len(lines) < 2:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by in lines:
        ax.plot(by["source_layer"], by["precision_at_1"], marker="o", ms=3, label=label)
    ax.set_xlabel("source block ℓ (= ℓ*)")
    ax.set_ylabel("precision@1")
    ax.set_title("Token identity: few-shot prompt vs single-token prompt", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "single_token.png", dpi=110)
    plt.close(fig)
    return [root / "single_token.png"]


def _scale_figure(runs: list[dict], attr: pd.DataFrame, root: Path) -> list[Path]:
    entity = [
        {"scale": r["scale"], "similarity": float(np.nanmean([v.get(_sim(r), np.nan) for v in by_layer]))}
        for r in runs
        if r["experiment"] == "entity_resolution" and (by_layer := r["metrics"]["by_layer_all"])
    ]
    scaled_attr = attr[attr["placeholder"] == attr["placeholder"].mode()[0]] if len(attr) else attr
    if (len(scaled_attr) == 0 or scaled_attr["scale"].nunique() < 2) and len({e["scale"] for e in entity}) < 2:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if len(scaled_attr) and scaled_attr["scale"].nunique() > 1:
        for task, group in scaled_attr.groupby("task"):
            group = group.sort_values("scale")
            axes[0].plot(group["scale"], group["patchscope_mean"], marker="o", ms=3, label=task)
        axes[0].legend(fontsize=6)
    axes[0].set_title("attribute extraction: Patchscope mean over ℓ", fontsize=9)
    axes[0].set_xlabel("α (patch α·h)")
    if entity:
        frame = pd.DataFrame(entity).groupby("scale")["similarity"].mean().sort_index()
        axes[1].plot(frame.index, frame.values, marker="o")
    axes[1].set_title("entity description: similarity, mean over ℓ", fontsize=9)
    axes[1].set_xlabel("α (patch α·h)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "scale.png", dpi=110)
    plt.close(fig)
    return [root / "scale.png"]


def _sim(run: dict) -> str:
    first = run["metrics"]["by_layer_all"][0] if run["metrics"]["by_layer_all"] else {}
    return "embedding_cosine" if "embedding_cosine" in first else "rouge_l"
