"""Table 2 of the paper, computed the paper's way, beside its own columns and our controls.

Per task and source block ℓ, accuracy = share of samples for which some target block ℓ* gives the
object; a cell is mean ± std of that accuracy over ℓ (not the best ℓ), for the Patchscope and the
linear probe, with a paired t-test over blocks, Bonferroni-corrected over the tasks of the table.
Controls sit in the same row: `prompt_only`, `subject_in_prompt` and `source_in_prompt` (one score
per sample), `embedding_only` (any ℓ*, one score per sample), `shuffled_source`, `zero` and `mean`
(mean over ℓ, like the Patchscope); `gain` = the Patchscope's mean minus `source_in_prompt`, in
points. A task is flagged when the Patchscope's mean does not beat `shuffled_source`,
`embedding_only`, the null patches and `source_in_prompt` (those that ran): its "correct" answers
may come from the prompt or from the source text given as text, not from the patched state.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from patchscan.metrics.stats import any_target_block, bonferroni, over_blocks, paired_ttest, significance_mark

log = logging.getLogger(__name__)
PER_SAMPLE_CONTROLS = ("prompt_only", "subject_in_prompt", "embedding_only", "source_in_prompt")
OVER_BLOCK_CONTROLS = ("shuffled_source", "zero", "mean")  # mean ± std over ℓ, like the Patchscope
PAPER_COLUMNS = ("probe_mean", "probe_std", "patchscope_mean", "patchscope_std", "significant", "n")


def read_paper_table(path) -> pd.DataFrame | None:
    """The paper's Table 2 (one row per LRE relation), or None with a warning when the file is absent."""
    if not path:
        return None
    path = Path(str(path)).expanduser()
    if not path.is_file():
        log.warning("paper table %s not found: the paper columns stay blank", path)
        return None
    return pd.read_csv(path).set_index("lre_relation")


def per_block(rows: pd.DataFrame) -> pd.Series:
    """Accuracy by source block: any ℓ* per (sample, ℓ), then the mean over samples."""
    scored = any_target_block(rows, ["example_id", "source_layer"])
    return scored.groupby("source_layer")["correct"].mean()


def per_sample_accuracy(rows: pd.DataFrame) -> float:
    """Share of samples with a correct row (any ℓ* where there are several)."""
    if rows.empty:
        return math.nan
    return float(rows.groupby("example_id")["correct"].agg(lambda c: c.astype(bool).any()).mean())


def _task_row(task: str, df: pd.DataFrame, probe: pd.DataFrame) -> dict:
    patched = df[df["method"] == "patchscope"]
    kept = set(patched["example_id"])
    scope_curve, probe_curve = per_block(patched), probe.groupby("source_layer")["correct"].mean()
    scope, probe_stats = over_blocks(scope_curve), over_blocks(probe_curve)
    t, p = paired_ttest(scope_curve, probe_curve)
    row = {
        "task": task,
        "n_samples": int(df["example_id"].nunique()),
        "n": len(kept),
        "classes": int(patched.drop_duplicates("example_id")["object"].nunique()),
        "patchscope_mean": scope["mean"],
        "patchscope_std": scope["std"],
        "patchscope_best": scope["best"],
        "patchscope_best_block": scope["best_block"],
        "probe_mean": probe_stats["mean"],
        "probe_std": probe_stats["std"],
        "blocks": scope["blocks"],
        "t": t,
        "p": p,
    }
    for method in OVER_BLOCK_CONTROLS:
        rows = df[(df["method"] == method) & df["example_id"].isin(kept)]
        stats = over_blocks(per_block(rows)) if len(rows) else {"mean": math.nan, "std": math.nan}
        row[f"{method}_mean"], row[f"{method}_std"] = stats["mean"], stats["std"]
    for method in PER_SAMPLE_CONTROLS:
        rows = df[df["method"] == method]
        row[method] = per_sample_accuracy(
            rows if method == "subject_in_prompt" else rows[rows["example_id"].isin(kept)]
        )
    row["gain"] = row["patchscope_mean"] - row["source_in_prompt"]  # NaN without the control
    return row


def attribute_table(df: pd.DataFrame, probe: pd.DataFrame, paper: pd.DataFrame | None, thresholds: dict) -> list[dict]:
    """One record per task (relation): ours (fractions), the t-test, the controls, the paper's (in %)."""
    tasks = [
        r for r in sorted(df["relation"].dropna().unique()) if (df[df["relation"] == r]["method"] == "patchscope").any()
    ]
    out = []
    for task in tasks:
        row = _task_row(task, df[df["relation"] == task], probe[probe["relation"] == task])
        row["p_bonferroni"] = bonferroni(row["p"], len(tasks))
        row["significant"] = significance_mark(row["t"], row["p_bonferroni"], ("patchscope", "probe"), thresholds)
        controls = [row[f"{m}_mean"] for m in OVER_BLOCK_CONTROLS] + [row["embedding_only"], row["source_in_prompt"]]
        row["beats_controls"] = all(c != c or row["patchscope_mean"] > c for c in controls)
        has_paper = paper is not None and task in paper.index
        for column in PAPER_COLUMNS:
            value = paper.loc[task, column] if has_paper else None
            row[f"paper_{column}"] = (
                None if value is None or (isinstance(value, float) and math.isnan(value)) else value
            )
        out.append(row)
    return out


def _pm(mean, std) -> str:
    return "-" if mean is None or mean != mean else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _paper_pm(mean, std) -> str:
    return "-" if mean is None else f"{float(mean):.1f} ± {float(std):.1f}"


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def format_table(tasks: list[dict]) -> str:
    """Table 2's layout (accuracy in %, mean ± std over source blocks), the paper's columns beside ours,
    then the controls; `!` marks tasks where the Patchscope does not beat shuffled_source, embedding_only,
    zero, mean and source_in_prompt (those that ran); gain = patchscope − source_in_prompt, in points."""
    lines = []
    for r in tasks:
        lines.append(
            {
                "task": r["task"],
                "n": f"{r['n']}/{r['n_samples']}",
                "probe": _pm(r["probe_mean"], r["probe_std"]),
                "patchscope": _pm(r["patchscope_mean"], r["patchscope_std"]),
                "t": "-" if r["t"] != r["t"] else f"{r['t']:.2f}",
                "p_bonf": "-" if r["p_bonferroni"] != r["p_bonferroni"] else f"{r['p_bonferroni']:.2g}",
                "sig": r["significant"] or "",
                "paper_probe": _paper_pm(r["paper_probe_mean"], r["paper_probe_std"]),
                "paper_patchscope": _paper_pm(r["paper_patchscope_mean"], r["paper_patchscope_std"]),
                "paper_sig": r["paper_significant"] or "",
                "paper_n": "-" if r["paper_n"] is None else str(int(r["paper_n"])),
                "best(ℓ)": "-"
                if r["patchscope_best_block"] is None
                else f"{_pct(r['patchscope_best'])} ({r['patchscope_best_block']})",
                "prompt_only": _pct(r["prompt_only"]),
                "subject_in_prompt": _pct(r["subject_in_prompt"]),
                "embedding_only": _pct(r["embedding_only"]),
                "shuffled_source": _pm(r["shuffled_source_mean"], r["shuffled_source_std"]),
                "zero": _pm(r.get("zero_mean"), r.get("zero_std")),
                "mean": _pm(r.get("mean_mean"), r.get("mean_std")),
                "source_in_prompt": _pct(r.get("source_in_prompt")),
                "gain": "-" if r.get("gain") is None or r["gain"] != r["gain"] else f"{100 * r['gain']:+.1f}",
                "": "" if r["beats_controls"] else "!",
            }
        )
    return pd.DataFrame(lines).to_string(index=False)
