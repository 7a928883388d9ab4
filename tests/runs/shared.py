"""What the runs tests share: one small real run (`base`, made once per module) and a runner
experiment without a model (`FakeExperiment`, `fake_chunk`) for faults in the runner itself."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from patchscan.runs import identity
from tests.helpers import cli, rows

# ---------------------------------------------------------------- one shared small run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny next_token run over a text file: 6 examples in 3 parts; its stderr went to a pipe (a log)."""
    from patchscan.data.texts import load_texts

    tmp = tmp_path_factory.mktemp("base")
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(load_texts({"kind": "builtin", "name": "texts"})[:12]) + "\n")
    args = [
        "+experiment=next_token",
        "model=tiny_llama",
        "dataset=text",
        f"dataset.path={texts}",
        "dataset.limit=6",
        "methods=[token_identity,logit_lens]",
        "runner.examples_per_part=2",
    ]
    run = tmp / "run"
    proc = cli("run", *args, f"hydra.run.dir={run}", cwd=tmp)
    return {"tmp": tmp, "args": args, "run": run, "texts": texts, "stderr": proc.stderr, "rows": rows(run / "results")}


def copy_run(base, dest: Path) -> Path:
    shutil.copytree(base["run"], dest)
    return dest


def meta_of(cfg) -> dict:
    from omegaconf import OmegaConf

    return {
        "fingerprint": identity.config_fingerprint(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "num_shards": int(cfg.runner.num_shards),
    }


class FakeExperiment:
    """A scope without a model: rows from the examples alone (for runner faults)."""

    @staticmethod
    def metrics(df, cfg):
        return {
            "experiment": "fake",
            "n_examples": int(df["example_id"].nunique()),
            "undefined": math.nan,
            "by_layer": [{"source_layer": 1, "value": float("inf")}],
        }

    @staticmethod
    def report(metrics):
        return ""

    @staticmethod
    def plot(df, metrics, run_dir):
        return []


def fake_chunk(chunk, progress):
    progress(len(chunk))
    return pd.DataFrame(
        [
            {
                "example_id": e["example_id"],
                "method": "fake",
                "source_layer": layer,
                "target_layer": None if layer else 3,
                "source_position": 1.0,
                "target_position": None,
                "value": layer * int(e["example_id"]),
            }
            for e in chunk
            for layer in (0, 1)
        ]
    )
