"""Figure 6's view: accuracy against the source block, one panel per task, one line per method."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from patchscan.plots.curves import wrapped  # noqa: E402


def task_panels(curves: pd.DataFrame, path: Path, title: str = "", value: str = "accuracy") -> Path:
    """`curves` has task, method, source_layer and `value`; a grid of panels, up to 4 a row."""
    tasks = sorted(curves["task"].unique())
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for method, group in curves[curves["task"] == task].groupby("method", sort=True):
            group = group.sort_values("source_layer")
            ax.plot(group["source_layer"], group[value], marker="o", ms=3, label=str(method))
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("source block ℓ", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel(value)
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(wrapped(title, fig.get_figwidth()), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
