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
