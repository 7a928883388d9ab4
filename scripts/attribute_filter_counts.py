"""How many samples of each Table 2 relation a model keeps after the paper's filter (the object appears
in the continuation of the relation prompt with the subject written in), over every TSV row.

    PYTHONPATH=src python scripts/attribute_filter_counts.py [model=NAME] [dataset.tsv=DIR] [KEY=VALUE ...]

Prints, per relation: rows (source windows with the subject), samples (distinct sample_id), and
those kept. Only the filter runs (one greedy continuation per distinct sample), no patching.
"""

from __future__ import annotations

import sys

import pandas as pd
from hydra import compose, initialize_config_dir

from patchscan.experiments.attributes import AttributeExperiment
from patchscan.models import load_model
from patchscan.paths import config_dir


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            [
                "+experiment=attribute_extraction",
                "dataset=patchscopes_tsv",
                "dataset.per_relation_limit=null",
                *overrides,
            ],
        )
    scope = AttributeExperiment(cfg)
    scope.bind(load_model(cfg.model))
    examples = scope.examples()
    rows = scope.frame(scope._filter_rows(examples))
    rows["sample_id"] = [e["sample_id"] for e in examples]
    kept = rows[rows["correct"]]
    table = (
        pd.DataFrame(
            {
                "rows": rows.groupby("relation").size(),
                "samples": rows.groupby("relation")["sample_id"].nunique(),
                "rows_kept": kept.groupby("relation").size(),
                "samples_kept": kept.groupby("relation")["sample_id"].nunique(),
            }
        )
        .fillna(0)
        .astype(int)
    )
    print(f"{cfg.model.name}: the paper's filter over every TSV row ({int(cfg.generation.max_new_tokens)} tokens)")
    print(table.to_string())


if __name__ == "__main__":
    main(sys.argv[1:])
