"""The row contract (docs/design.md §5, docs/running.md "What a run writes"), defined once for every experiment.

Every row carries what re-runs it alone (`run_columns`: example, method, both models, source and
target token ids, positions, blocks and sites). Next-token rows add `next_token_columns`; generation
rows add `subject`, `object`, `generation` and their metrics. `frame` turns rows into a
DataFrame whose block and position columns are nullable integers in every part file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The columns of every row, in order.
RUN_COLUMNS = (
    "example_id",
    "method",
    "model",
    "target_model",
    "source_token_ids",
    "source_position",
    "source_layer",
    "target_token_ids",
    "target_position",
    "target_layer",
    "source_site",
    "target_site",
)
# Next-token rows add these (surprisal only where p_L and the prediction share a vocabulary).
NEXT_TOKEN_COLUMNS = (
    "source_text",
    "target_prompt",
    "pred_token_id",
    "ref_token_id",
    "pred_token",
    "ref_token",
    "precision_at_1",
    "surprisal",
)
# Generation rows add these, plus their metric columns (correct, rouge_l, ...).
GENERATION_COLUMNS = ("subject", "object", "generation")
# Block and position columns: nullable integers, so every part file has the same Parquet type even
# when a chunk holds only rows without them (baselines, filtered examples).
INDEX_COLUMNS = ("source_layer", "target_layer", "source_position", "target_position")


def patch_columns(
    *,
    source_token_ids: Sequence[int] | None,
    source_position: int | None,
    source_layer: int | None,
    target_token_ids: Sequence[int],
    target_position: int | None,
    target_layer: int | None,
    source_site: str,
    target_site: str,
) -> dict:
    """Where one patch's vector came from and where it went, in the row contract's names and order:
    the columns the runner's rows and the API's result frames (`to_frame`) share."""
    return {
        "source_token_ids": None if source_token_ids is None else [int(t) for t in source_token_ids],
        "source_position": source_position,
        "source_layer": source_layer,
        "target_token_ids": [int(t) for t in target_token_ids],
        "target_position": target_position,
        "target_layer": target_layer,
        "source_site": source_site,  # models.families.SITES: where in the block it was read
        "target_site": target_site,  # and where it was written
    }


def run_columns(*, example_id: str, method: str, model: str, target_model: str, **patch: Any) -> dict:
    """The columns every row has: enough to re-run it alone (all keyword-only, all required; the
    patch's are those of `patch_columns`).

    >>> from patchscan.runs.row_schema import run_columns, RUN_COLUMNS
    >>> row = run_columns(example_id="0", method="patchscope", model="m", target_model="m",
    ...     source_token_ids=[1, 2], source_position=1, source_layer=3,
    ...     target_token_ids=[4, 5], target_position=1, target_layer=3,
    ...     source_site="resid_post", target_site="mlp_out")
    >>> tuple(row) == RUN_COLUMNS
    True
    """
    ids = {"example_id": str(example_id), "method": method, "model": model, "target_model": target_model}
    return {**ids, **patch_columns(**patch)}


def next_token_columns(
    *,
    source_text: str,
    target_prompt: str | None,
    pred_token_id: int,
    ref_token_id: int,
    pred_token: str,
    ref_token: str,
    precision_at_1: bool,
    surprisal: float | None = None,
) -> dict:
    """The columns a next-token row adds (`surprisal` left out where it is undefined)."""
    row = {
        "source_text": source_text,
        "target_prompt": target_prompt,
        "pred_token_id": int(pred_token_id),
        "ref_token_id": int(ref_token_id),
        "pred_token": pred_token,
        "ref_token": ref_token,
        "precision_at_1": bool(precision_at_1),
    }
    if surprisal is not None:
        row["surprisal"] = float(surprisal)
    return row


def int_columns(df):
    """`df` with its block and position columns as nullable integers (Int64): the one cast, for the
    runner's part files and the API's frames alike (None, NaN and pd.NA become <NA>)."""
    import math

    import pandas as pd

    df = df.copy()
    for column in INDEX_COLUMNS:
        if column in df:
            values = [
                None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else int(v)
                for v in df[column]
            ]
            df[column] = pd.array(values, dtype="Int64")
    return df


def frame(rows: list[dict]):
    """The rows of a chunk as a DataFrame, block and position columns as nullable integers."""
    import pandas as pd

    return int_columns(pd.DataFrame(rows))
