"""Means with standard errors, grouped, as plain dicts ready for metrics.json."""

from __future__ import annotations

import math

import pandas as pd


def mean_se(values: pd.Series) -> dict:
    values = values.astype(float).dropna()
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "n": n}


def grouped_mean_se(df: pd.DataFrame, by: list[str], columns: list[str]) -> list[dict]:
    out = []
    for key, group in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        record = {b: (k.item() if hasattr(k, "item") else k) for b, k in zip(by, key)}
        for column in columns:
            stats = mean_se(group[column])
            record[column] = stats["mean"]
            record[f"{column}_se"] = stats["se"]
        record["n"] = len(group)
        out.append(record)
    return out


def any_target_block(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The paper's per-sample score: correct at `by` (e.g. relation, example, source block) when some
    target block ℓ* gives the object. One row per group, `correct` a bool."""
    return rows.groupby(by)["correct"].agg(lambda c: bool(c.astype(bool).any())).reset_index()


def over_blocks(per_block: pd.Series) -> dict:
    """Mean ± std over source blocks of a per-block accuracy (Table 2's cells), plus the best block.

    The std is the population std over blocks (ddof=0, numpy's default): the spread of the curve,
    not an error of its mean."""
    values = per_block.astype(float).dropna()
    if values.empty:
        return {"mean": math.nan, "std": math.nan, "best": math.nan, "best_block": None, "blocks": 0}
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=0)),
        "best": float(values.max()),
        "best_block": int(values.idxmax()),
        "blocks": len(values),
    }


def paired_ttest(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """Paired t-test of two per-block accuracies on the blocks both have (t > 0: `a` higher).

    NaN when fewer than two blocks pair up or every difference is the same (no variance)."""
    from scipy.stats import ttest_rel

    paired = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    diff = paired["a"] - paired["b"]
    if len(paired) < 2 or diff.nunique() < 2:
        return math.nan, math.nan
    result = ttest_rel(paired["a"].astype(float), paired["b"].astype(float))
    return float(result.statistic), float(result.pvalue)


def bonferroni(p: float, tests: int) -> float:
    """A p-value corrected for `tests` comparisons (capped at 1; NaN stays NaN)."""
    return p if p != p else min(1.0, p * max(1, int(tests)))


def significance_mark(t: float, p_corrected: float, names: tuple[str, str], thresholds: dict) -> str:
    """Table 2's `significant` cell: the favoured method's name and stars for the smallest threshold
    the corrected p-value passes (`{"**": 1e-5, "*": 1e-4}` in the paper), or "" if none."""
    if p_corrected != p_corrected:
        return ""
    stars = [mark for mark, level in sorted(thresholds.items(), key=lambda kv: kv[1]) if p_corrected < float(level)]
    if not stars:
        return ""
    return (names[0] if t > 0 else names[1]) + stars[0]
