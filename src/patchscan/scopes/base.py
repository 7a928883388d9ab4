"""What every experiment (scope) provides to the runner and to `patchscan eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
from omegaconf import DictConfig

from patchscan.models.view import ModelView


class Scope:
    """An experiment: turns examples into patched runs and rows; metrics and plots from rows only.

    Subclasses set `name`, load their data in `__init__` (cheap checks before any model is
    loaded), and implement `examples`, `run_chunk`, and the static `metrics`, `report`, `plot`.
    """

    name = "base"

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

    def common_columns(self) -> dict:
        return {"model": self.view.name, "target_model": self.view.name}
