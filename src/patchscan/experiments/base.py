"""What every experiment (scope) provides to the runner and to `patchscan eval`, and the set-up
they share: layer pairs, dataset limits, held-out splits, source positions, source capture and the
row contract's common columns."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from patchscan import engine as batched_engine
from patchscan import grids
from patchscan.errors import UserError
from patchscan.experiments.prompts import placeholder_position
from patchscan.grids import layer_pairs
from patchscan.models.families import DEFAULT_SITE
from patchscan.models.view import ModelView
from patchscan.runs import row_schema as row_contract


class Experiment:
    """An experiment: turns examples into patched runs and rows; metrics and plots from rows only.

    Subclasses set `name`, load their data in `__init__` (cheap checks before any model is
    loaded), and implement `examples`, `run_chunk`, and the static `metrics`, `report`, `plot`.
    `examples` only reads and tokenizes, and returns plain data (dicts of strings, ints and token
    ids); all model work happens in `run_chunk`, through `self.engine` (`capture`, `generate`,
    `patched_next_token`), so that shards split it, a resume redoes only missing chunks, and a dry
    run (`patchscan.runs.dry_run`) can swap in an engine that counts the work instead of doing it (the
    engine's own schedulers, a counting backend, stand-in outputs: the experiment runs unchanged).
    """

    name = "base"
    engine = batched_engine
    # sweep.source_positions kinds this experiment honours (random, last, all, list, one); others
    # are refused when it starts. None: the scope checks them itself.
    position_specs: tuple[str, ...] | None = None
    # what `sweep.source_positions=default` means here (the paper's choice for this experiment)
    default_source_positions = "last"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        grids.check_sweep(cfg.get("sweep"))
        # where in a block states are read and written (models.families.SITES; runs.config_checks)
        patchscope = cfg.get("patchscope") or {}
        self.source_site = str(patchscope.get("source_site") or DEFAULT_SITE)
        self.target_site = str(patchscope.get("target_site") or DEFAULT_SITE)
        self.check_source_positions()
        # inputs left out, by reason (patchscan.data.drops): by the loaders, and by the last `examples()`
        self.load_drops: Counter[str] = Counter()
        self.example_drops: Counter[str] = Counter()

    @property
    def dropped(self) -> Counter:
        """Every input left out so far, by reason: the run logs it and writes it to metrics.json."""
        return self.load_drops + self.example_drops

    def bind(self, view: ModelView, target_view: ModelView | None = None) -> None:
        """Attach the loaded model(s); validate layers, prompts and positions against them."""
        self.view = view
        self.target_view = target_view or view

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

    # ------------------------------------------------------------------ engine settings

    def batching(self) -> dict:
        """Engine keyword arguments from `runner`: micro-batch size (or auto) and memory budget."""
        runner = self.cfg.runner
        return {"batch_size": runner.batch_size, "memory_budget_gb": runner.get("memory_budget_gb")}

    @property
    def stop_when_correct(self) -> bool:
        """`generation.stop_when_correct` (default on): rows stop once their answer is decided."""
        return bool(self.cfg.get("generation", {}).get("stop_when_correct", True))

    def generating(self) -> dict:
        """generate's keyword arguments: batching, and whether rows share blocks 0..ℓ* while decoding."""
        share = bool(self.cfg.get("generation", {}).get("share_lower_blocks", True))
        return {**self.batching(), "share_lower_blocks": share}

    def capture_batch_size(self) -> int:
        size = self.cfg.runner.batch_size
        return 64 if size in (None, "auto", 0) else int(size)

    @property
    def planning(self) -> bool:
        """True in a dry run. Read only by the filters (attribute_extraction's `filter`, multihop's
        single hops), which then keep every example (the plan is an upper bound): a stand-in
        generation cannot contain an answer the engine never sees."""
        return bool(getattr(self.engine, "planning", False))

    # ------------------------------------------------------------------ shared set-up

    def set_layer_pairs(self) -> None:
        """`pairs` (source block, target block) of the sweep, against the source and target models,
        and `source_layers`, the blocks to capture."""
        sweep = self.cfg.sweep
        self.pairs = layer_pairs(
            sweep.source_layers, sweep.target_layers, self.view.n_blocks, self.target_view.n_blocks
        )
        self.source_layers = sorted({s for s, _ in self.pairs})

    def set_target_prompt(self, prompt: str) -> None:
        """`prompt`, `target_ids` and `target_position` (its placeholder, `patchscope.placeholder` and
        `placeholder_occurrence`) in the target model: the experiments with one target prompt."""
        patchscope = self.cfg.patchscope
        self.prompt = prompt
        self.target_ids, self.target_position = placeholder_position(
            self.target_view, prompt, patchscope.placeholder, patchscope.get("placeholder_occurrence")
        )

    def limited(self, items: list) -> list:
        """The first `dataset.limit` items (all without a limit)."""
        limit = self.cfg.dataset.get("limit")
        return items[: int(limit)] if limit else items

    def limit_reached(self, items: list) -> bool:
        """Whether `items` already holds `dataset.limit` items (for loops that skip some)."""
        limit = self.cfg.dataset.get("limit")
        return bool(limit) and len(items) >= int(limit)

    @staticmethod
    def held_out(texts: list[str], n_train: int, key: str) -> tuple[list[str], list[str]]:
        """(training texts, evaluation texts): the last `n_train` texts are held out for fitting and
        never evaluated; `key` names the setting in the error when nothing is left to evaluate."""
        if n_train >= len(texts):
            raise UserError(f"{key}={n_train} leaves no text to evaluate (the dataset has {len(texts)})")
        cut = len(texts) - n_train
        return texts[cut:], texts[:cut]

    def position_spec(self):
        """`sweep.source_positions`, with `default` replaced by this experiment's own default."""
        spec = self.cfg.get("sweep", {}).get("source_positions", "default")
        is_default = isinstance(spec, str) and spec.strip().lower() == "default"
        return self.default_source_positions if is_default else spec

    def check_source_positions(self) -> None:
        """Refuse a `sweep.source_positions` this experiment cannot honour, before any model loads."""
        if self.position_specs is None:
            return
        spec = self.position_spec()
        kind = spec.strip().lower() if isinstance(spec, str) else None
        if kind not in ("random", "last", "all"):
            try:
                parts = grids.parse(spec, "sweep.source_positions")
            except UserError:
                parts = None  # no position spec: refused below, with what this experiment takes
            if parts is not None:
                kind = "one" if len(parts) == 1 and isinstance(parts[0], int) else "list"
                kind = "list" if kind == "one" and "one" not in self.position_specs else kind
        if kind not in self.position_specs:
            names = {"list": "a list of positions", "one": "one position"}
            allowed = ", ".join(names.get(k, k) for k in self.position_specs)
            raise UserError(f"sweep.source_positions={spec!r}: {self.name} takes {allowed}")

    def source_positions(self, length: int, index: int, low: int = 0) -> list[int]:
        """The positions `sweep.source_positions` picks in a prompt of `length` tokens: `random` is
        one position in [low, length) seeded by runner.seed and the example's index."""
        spec = self.position_spec()
        if isinstance(spec, str) and spec.strip().lower() == "random":
            return [random.Random(f"{int(self.cfg.runner.seed)}-{index}").randint(low, length - 1)]
        return grids.positions(spec, length, "sweep.source_positions")

    def capture_sources(
        self, examples: list[dict], layers: Sequence[int] | None = None, with_logprobs=False, site: str | None = None
    ):
        """Source states of the examples (`ids`, `position`) at `layers` (default: `source_layers`), read
        at `site` (default: the configured `source_site`)."""
        return self.engine.capture(
            self.view,
            [e["ids"] for e in examples],
            list(self.source_layers if layers is None else layers),
            [[e["position"]] for e in examples],
            batch_size=self.capture_batch_size(),
            with_logprobs=with_logprobs,
            site=site or self.source_site,
        )

    # ------------------------------------------------------------------ rows

    @staticmethod
    def frame(rows: list[dict]) -> pd.DataFrame:
        """The rows of a chunk as a DataFrame, block and position columns as nullable integers."""
        return row_contract.frame(rows)

    def common_columns(self) -> dict:
        return {"model": self.view.name, "target_model": getattr(self, "target_view", self.view).name}

    def run_columns(
        self,
        example: dict,
        method: str,
        source_layer,
        target_ids,
        target_position,
        target_layer,
        target_site=None,
        source_site=None,
    ) -> dict:
        """The row contract's common columns for one patched run of an example (`ids`, `position`);
        the sites are the configured ones (`target_site` overrides, e.g. a lens reads the last block's
        output; `source_site`, e.g. superscopes reads several sites in one run)."""
        return row_contract.run_columns(
            example_id=example["example_id"],
            method=method,
            **self.common_columns(),
            source_token_ids=example["ids"],
            source_position=example["position"],
            source_layer=source_layer,
            target_token_ids=target_ids,
            target_position=target_position,
            target_layer=target_layer,
            source_site=source_site or self.source_site,
            target_site=target_site or self.target_site,
        )
