"""Line plots of a metric against the source block, one line per method (or per pair of values), with SE bands."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def wrapped(title: str, width_inches: float, fontsize: float = 12) -> str:
    """A title broken into lines that fit the figure's width (about 0.55 em per character)."""
    chars = max(20, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(title, chars))


def method_curves(
    by: pd.DataFrame, columns: list[str], labels: list[str], path: Path, title: str = "", line_column: str = "method"
) -> Path:
    """One panel per column; x = source_layer; one line per `line_column` value; shaded ±1 SE."""
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4), squeeze=False)
    for ax, column, label in zip(axes[0], columns, labels):
        for name, group in by.groupby(line_column, sort=True):
            group = group.sort_values("source_layer")
            x, y = group["source_layer"], group[column]
            ax.plot(x, y, marker="o", ms=3, label=str(name))
            if f"{column}_se" in group:
                se = group[f"{column}_se"].fillna(0)
                ax.fill_between(x, y - se, y + se, alpha=0.2)
        ax.set_xlabel("source block ℓ")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(wrapped(title, fig.get_figwidth()))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def styled_curves(
    by: pd.DataFrame, column: str, ylabel: str, path: Path, color: str, style: str, title: str = ""
) -> Path:
    """One panel; x = source_layer; one line per (`color`, `style`) pair of values: a colour for each
    value of one column, a line style for each of the other (e.g. site × {auto α, α=1}); ±1 SE bands."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(by[color]))}
    styles = dict(zip(dict.fromkeys(by[style]), ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))] * 4))
    for (c, s), group in by.groupby([color, style], sort=False):
        group = group.sort_values("source_layer")
        x, y = group["source_layer"].astype(float), group[column]
        ax.plot(x, y, marker="o", ms=3, color=colors[c], linestyle=styles[s], label=f"{c}, {s}")
        if f"{column}_se" in group:
            se = group[f"{column}_se"].fillna(0)
            ax.fill_between(x, y - se, y + se, color=colors[c], alpha=0.1)
    ax.set_xticks(sorted(by["source_layer"].astype(int).unique()))
    ax.set_xlabel("source block ℓ")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(wrapped(title, fig.get_figwidth(), 10), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(value) -> str:
    """Block numbers stored as floats (a column with nulls) print as integers."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def heatmap(matrix: pd.DataFrame, path: Path, title: str, xlabel: str, ylabel: str, fmt: str = ".2f") -> Path:
    """A heatmap of a (rows × columns) table, values annotated when small enough to read."""
    fig, ax = plt.subplots(figsize=(1 + 0.35 * matrix.shape[1] + 2, 1 + 0.3 * matrix.shape[0] + 1))
    im = ax.imshow(matrix.values, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(matrix.shape[1]), [_label(c) for c in matrix.columns], fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [_label(r) for r in matrix.index], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(wrapped(title, fig.get_figwidth() * 0.75, 10), fontsize=10)
    fig.colorbar(im, ax=ax)
    if matrix.size <= 400:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                v = matrix.values[i, j]
                if v == v:
                    ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
