"""What every experiment (scope) provides to the runner and to `patchscan eval`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from patchscan import engine as batched_engine
from patchscan.models.view import ModelView

# Row columns that hold block or position indices: nullable integers, so every part file has the
# same Parquet type even when a chunk holds only rows without them (baselines, filtered examples).
INDEX_COLUMNS = ("source_layer", "target_layer", "source_position", "target_position")


class Scope:
    """An experiment: turns examples into patched runs and rows; metrics and plots from rows only.

    Subclasses set `name`, load their data in `__init__` (cheap checks before any model is
    loaded), and implement `examples`, `run_chunk`, and the static `metrics`, `report`, `plot`.
    `examples` only reads and tokenizes; all model work happens in `run_chunk`, through
    `self.engine` (`capture`, `generate`, `patched_next_token`), so that shards split it, a resume
    redoes only missing chunks, and a dry run (`patchscan.planning`) can swap in an engine that
    counts the work instead of doing it.
    """

    name = "base"
    engine = batched_engine

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def bind(self, view: ModelView) -> None:
        """Attach the loaded model; validate layers, prompts and positions against it."""
        self.view = view

    def examples(self) -> list[dict]:
        raise NotImplementedError

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        """Rows of a chunk of examples; `progress(n)` counts patched runs as the engine finishes them."""
        raise NotImplementedError

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        raise NotImplementedError

    @staticmethod
    def report(metrics: dict) -> str:
        return ""

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        return []

    def batching(self) -> dict:
        """Engine keyword arguments from `runner`: micro-batch size (or auto) and memory budget."""
        runner = self.cfg.runner
        return {"batch_size": runner.batch_size, "memory_budget_gb": runner.get("memory_budget_gb")}

    def capture_batch_size(self) -> int:
        size = self.cfg.runner.batch_size
        return 64 if size in (None, "auto", 0) else int(size)

    @property
    def planning(self) -> bool:
        """True in a dry run: the engine returns placeholders, so data-dependent filters keep every
        example (the plan is an upper bound)."""
        return bool(getattr(self.engine, "planning", False))

    @staticmethod
    def frame(rows: list[dict]) -> pd.DataFrame:
        """The rows of a chunk as a DataFrame, block and position columns as nullable integers."""
        df = pd.DataFrame(rows)
        for column in INDEX_COLUMNS:
            if column in df:
                df[column] = df[column].astype("Int64")
        return df

    def common_columns(self) -> dict:
        return {"model": self.view.name, "target_model": self.view.name}
