"""LRE relation files (Hernandez et al.; public repository evandez/relations, folder data/) and the
Patchscopes repository's preprocessed attribute-extraction TSV files.

A relation file holds `name`, `prompt_templates`, `prompt_templates_zs` (with `{}` for the
subject), `properties` and `samples` (`subject`, `object`). A path may be one file or a folder,
searched recursively.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from patchscan.data.drops import nothing_left
from patchscan.errors import UserError


@dataclass
class Relation:
    name: str
    key: str  # file stem, e.g. country_capital_city
    templates: list[str]
    templates_zs: list[str]
    samples: list[dict]
    properties: dict = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)  # samples left out, by reason (patchscan.data.drops)

    def target_prompt(self, placeholder: str = "x") -> str:
        """A target prompt ending in the placeholder, from the first template with text before `{}`.

        'The capital of {} is the city of' -> 'The capital of x'. Subject-first templates
        ('{} is part of') keep their whole text, with the placeholder where the subject was.
        """
        for template in self.templates_zs + self.templates:
            head = template.split("{}")[0]
            if head.strip():
                return head + placeholder
        return (self.templates_zs or self.templates)[0].replace("{}", placeholder)


def _relation_from_file(path: Path) -> Relation:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read LRE relation file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise UserError(f"{path} is not an LRE relation file (needs 'samples': a list of subject/object pairs)")
    templates = list(data.get("prompt_templates") or [])
    templates_zs = list(data.get("prompt_templates_zs") or [])
    if not templates + templates_zs or not all("{}" in t for t in templates + templates_zs):
        raise UserError(f"{path}: every prompt template needs a '{{}}' for the subject")
    samples, dropped = [], Counter()
    for sample in data["samples"]:
        problem = sample_problem(sample)
        if problem:
            dropped[f"LRE samples {problem}"] += 1
        else:
            samples.append(sample)
    name = data.get("name") or path.stem
    return Relation(name, path.stem, templates, templates_zs, samples, dict(data.get("properties") or {}), dropped)


def sample_problem(sample) -> str | None:
    """Why an LRE sample cannot be used ('without a text object', ...), None when it can."""
    if not isinstance(sample, dict):
        return "that are not a JSON object"
    for key in ("subject", "object"):
        if key not in sample or sample[key] in (None, ""):
            return f"without {key!r}"
        if not isinstance(sample[key], str) or not sample[key].strip():
            return f"whose {key!r} is not text"
    return None


def load_relations(path: str | Path, names=None) -> list[Relation]:
    """Relations from a file or a folder; `names` keeps those whose file stem or name is listed."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"LRE path not found: {path}")
    relations = [_relation_from_file(f) for f in files]
    if names:
        wanted = [str(n) for n in names]
        known = {r.key for r in relations} | {r.name for r in relations}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise UserError(
                f"unknown relation {unknown[0]!r} in {path}; choose from {', '.join(sorted(r.key for r in relations))}"
            )
        relations = [r for r in relations if r.key in wanted or r.name in wanted]
    if not relations or not any(r.samples for r in relations):
        dropped = sum((r.dropped for r in relations), Counter())
        raise UserError(nothing_left(f"no relation samples found in {path}", dropped))
    return relations


TSV_COLUMNS = ("sample_id", "prompt_target", "position_target", "object", "subject", "prompt_source", "position_source")


def load_patchscopes_tsv(path: str | Path) -> list[dict]:
    """Rows of a Patchscopes preprocessed TSV (attribute extraction), as dicts."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"TSV file not found: {path}")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read TSV file {path}: {exc}") from exc
    if not rows:
        raise UserError(f"the TSV file {path} is empty")
    missing = [c for c in TSV_COLUMNS if c not in rows[0]]
    if missing:
        raise UserError(f"{path} lacks the column {missing[0]!r} (needs {', '.join(TSV_COLUMNS)})")
    for n, row in enumerate(rows, 2):
        short = next((c for c in TSV_COLUMNS if row.get(c) is None), None)
        if short or None in row:
            what = f"has no field {short!r}" if short else "has more fields than the header"
            raise UserError(
                f"{path}: line {n} {what} (every row needs the {len(rows[0])} tab-separated fields of the header)"
            )
    return rows


def relation_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
