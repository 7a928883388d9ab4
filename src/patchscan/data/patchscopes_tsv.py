"""The Patchscopes repository's preprocessed attribute-extraction samples (one TSV per relation).

A row is one source window of one sample: `sample_id` repeats over the (up to 5) WikiText windows
of a subject. `source_cropped_toks` (GPT-J tokens, a Python-list string) ends at the subject's
last token, the source position; a model of ours needs the same window in characters, so the
source text is `prompt_source` cut after the subject occurrence whose end is nearest the cropped
tokens' length (the tokens' text is not always a prefix of `prompt_source`: GPT-J byte tokens
print as replacement characters). Rows whose source does not contain the subject (some cells are
empty) are dropped, or keep the subject alone as their source (`missing_source=subject`).
"""

from __future__ import annotations

import ast
import logging
from collections import Counter, defaultdict
from itertools import zip_longest
from pathlib import Path

from patchscan.data.lre import load_patchscopes_tsv, relation_key
from patchscan.errors import UserError

log = logging.getLogger(__name__)
MISSING_SOURCE = ("drop", "subject")


def tsv_files(path, relations=None) -> list[Path]:
    """One TSV file, or every *.tsv under a folder; `relations` keeps those whose stem is listed."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.tsv"))
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"TSV path not found: {path}")
    if relations:
        known = {relation_key(f.stem): f for f in files}
        unknown = [str(r) for r in relations if relation_key(str(r)) not in known]
        if unknown:
            raise UserError(f"unknown relation {unknown[0]!r} in {path}; choose from {', '.join(sorted(known))}")
        files = [known[relation_key(str(r))] for r in relations]
    if not files:
        raise UserError(f"no .tsv file under {path}")
    return files


def cropped_source(row: dict) -> str | None:
    """The source window up to and including the subject occurrence the row's source position marks."""
    source, subject = row.get("prompt_source") or "", row["subject"]
    starts = [i for i in range(len(source)) if source.startswith(subject, i)]
    if not starts:
        return None
    try:
        toks = ast.literal_eval(row.get("source_cropped_toks") or "[]")
        end = len("".join(toks)) if isinstance(toks, list) and toks else len(source)
    except (ValueError, SyntaxError):
        end = len(source)
    best = min(starts, key=lambda s: (abs(s + len(subject) - end), -s))
    return source[: best + len(subject)]


def _round_robin(rows: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` rows taking one window of each sample in turn (more subjects, not more windows)."""
    if not limit:
        return rows
    by_sample: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_sample[row["sample_id"]].append(row)
    ordered = [r for group in zip_longest(*by_sample.values()) for r in group if r is not None]
    return ordered[: int(limit)]


def tsv_samples(
    path, relations=None, per_relation_limit=None, missing_source: str = "subject", dropped: Counter | None = None
) -> list[dict]:
    """Samples from the TSVs: relation (file stem), sample_id, subject, object, target and source prompts;
    the rows left out (missing_source=drop) are counted into `dropped`."""
    if missing_source not in MISSING_SOURCE:
        raise UserError(f"unknown dataset.missing_source {missing_source!r}; choose from {', '.join(MISSING_SOURCE)}")
    out = []
    for file in tsv_files(path, relations):
        relation, rows, missing = relation_key(file.stem), [], 0
        for n, row in enumerate(load_patchscopes_tsv(file)):
            source = cropped_source(row)
            missing += source is None
            if source is None and missing_source == "drop":
                continue
            rows.append(
                {
                    "example_id": f"{relation}/{n}",
                    "relation": relation,
                    "sample_id": f"{relation}/{row['sample_id']}",
                    "subject": row["subject"],
                    "object": row["object"],
                    "target_prompt": row["prompt_target"],
                    "source_prompt": row["subject"] if source is None else source,
                }
            )
        if missing and missing_source == "drop" and dropped is not None:
            dropped["TSV rows with no source text containing their subject (dataset.missing_source=drop)"] += missing
        if missing:
            what = "dropped" if missing_source == "drop" else "their source is the subject alone"
            log.warning(
                "%s: %d of %d rows have no source text containing their subject; %s",
                file,
                missing,
                n + 1,
                what,
            )
        out += _round_robin(rows, per_relation_limit)
    return out
