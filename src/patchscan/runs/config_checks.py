"""Check the composed config once, at job start, before any file is read or model loaded.

Each rule names a key, what it allows, and a check; a failed check is one `UserError` line naming
the key, the bad value and what is allowed (the CLI prints it and exits 2). Keys absent from an
experiment's config are skipped, so one table serves every experiment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from patchscan.errors import UserError
from patchscan.models.families import SITES


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole(minimum: int | None = None, optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    what = "a whole number" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
    return (lambda v: (optional and v is None) or (_is_int(v) and (minimum is None or v >= minimum))), what


def number(
    minimum: float = 0.0, optional: bool = False, maximum: float | None = None
) -> tuple[Callable[[Any], bool], str]:
    what = f"a number >= {minimum:g}" if maximum is None else f"a number from {minimum:g} to {maximum:g}"
    what += " or null" if optional else ""

    def ok(v) -> bool:
        if optional and v is None:
            return True
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return is_number and v >= minimum and (maximum is None or v <= maximum)

    return ok, what


def boolean() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join("null" if c is None else str(c) for c in choices)


def selection(optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    """A list that selects what runs (methods, relations): an empty one would select nothing, or, read
    as "not given", everything, so it is refused (null means all where `optional`)."""
    what = "a non-empty list" + (" or null (all)" if optional else "")
    return (lambda v: (optional and v is None) or (isinstance(v, ListConfig) and len(v) > 0)), what


def batch_size() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v == "auto" or (_is_int(v) and v >= 1)), "auto or a whole number >= 1"


def device() -> tuple[Callable[[Any], bool], str]:
    import re

    pattern = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
    return (lambda v: v is None or (isinstance(v, str) and bool(pattern.match(v)))), "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Rule:
    key: str
    check: tuple[Callable[[Any], bool], str]


RULES: tuple[Rule, ...] = (
    Rule("runner.batch_size", batch_size()),
    Rule("runner.memory_budget_gb", number(0.01, optional=True)),
    Rule("runner.examples_per_part", whole(1)),
    Rule("runner.resume", boolean()),
    Rule("runner.repair", boolean()),
    Rule("runner.dry_run", boolean()),
    Rule("runner.gpu_memory_gb", number(0.01, optional=True)),
    Rule("runner.shard", whole(0)),
    Rule("runner.num_shards", whole(1)),
    Rule("runner.seed", whole()),
    Rule("methods", selection()),
    Rule("dataset.relations", selection(optional=True)),
    Rule("multihop.directions", selection()),
    Rule("dataset.limit", whole(1, optional=True)),
    Rule("dataset.per_relation_limit", whole(1, optional=True)),
    Rule("generation.max_new_tokens", whole(1)),
    Rule("generation.case_sensitive", boolean()),
    Rule("generation.stop_when_correct", boolean()),
    Rule("generation.share_lower_blocks", boolean()),
    Rule("patchscope.random_pairs", whole(0, optional=True)),
    Rule("patchscope.prompt_seed", whole(optional=True)),
    Rule("patchscope.source_site", one_of(*SITES)),  # whether the model's family has it: checked at load
    Rule("patchscope.target_site", one_of(*SITES)),
    Rule("source.min_tokens", whole(1)),
    Rule("source.max_tokens", whole(1)),
    Rule("source.min_position", whole(0)),
    Rule("affine_lens.train_texts", whole(0)),
    Rule("affine_lens.positions_per_text", whole(1)),
    Rule("affine_lens.max_positions", whole(1)),
    Rule("affine_lens.ridge", number(0.0)),
    Rule("maps.train_texts", whole(1)),
    Rule("maps.max_positions", whole(1)),
    Rule("maps.ridge", number(0.0)),
    Rule("probe.enabled", boolean()),
    Rule("probe.folds", whole(2)),
    Rule("filter", boolean()),
    Rule("multihop.per_pair_limit", whole(1, optional=True)),
    Rule("multihop.require_single_hops", boolean()),
    Rule("multihop.backpatch", boolean()),
    Rule("similarity.embedding", boolean()),
    Rule("superscopes.auto_alpha", boolean()),
    Rule("superscopes.threshold", number(-1.0, maximum=1.0)),  # a cosine
    Rule("model.dtype", one_of(None, "auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")),
    Rule("target_model.dtype", one_of(None, "auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")),
    Rule("model.device", device()),
    Rule("target_model.device", device()),
    Rule("model.seed", whole(optional=True)),
    Rule("target_model.seed", whole(optional=True)),
)


# sweep.source_positions: next_token, entity_resolution and cross_model honour it (their scopes check
# it, `Experiment.position_specs`). These experiments read their source state at one position of their own
# and take only the value that names it: anything else would be ignored in silence.
FIXED_SOURCE_POSITION: dict[str, tuple[str, str]] = {
    "attribute_extraction": ("last", "the last token of the subject"),
    "multihop": ("last", "the last token of the hop-1 phrase and of the question"),
}


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value).replace("None", "null")


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_source_positions(cfg: DictConfig) -> None:
    experiment = (cfg.get("experiment") or {}).get("name")
    present, value = _select(cfg, "sweep.source_positions")
    if not present or experiment not in FIXED_SOURCE_POSITION:
        return
    from patchscan.experiments import get_experiment

    if getattr(get_experiment(experiment), "position_specs", None) is not None:
        return  # the scope says which positions it honours and checks them itself
    fixed, where = FIXED_SOURCE_POSITION[experiment]
    if value != fixed:
        raise UserError(
            f"sweep.source_positions={_show(value)} does not apply to {experiment}, which reads {where}; "
            f"use sweep.source_positions={fixed}"
        )


def validate(cfg: DictConfig) -> None:
    """Raise one UserError for the first value of the wrong type or out of range."""
    for rule in RULES:
        present, value = _select(cfg, rule.key)
        if not present:
            continue
        ok, allowed = rule.check
        if not ok(value):
            raise UserError(f"{rule.key}={_show(value)} is not valid; use {allowed}")
    _check_source_positions(cfg)
    runner = cfg.get("runner") or {}
    if "shard" in runner and "num_shards" in runner and not runner.shard < runner.num_shards:
        raise UserError(
            f"runner.shard={runner.shard} is out of range for runner.num_shards={runner.num_shards}; "
            f"use 0..{runner.num_shards - 1}"
        )
    source = cfg.get("source")
    if (
        isinstance(source, DictConfig)
        and "min_tokens" in source
        and "max_tokens" in source
        and source.max_tokens < source.min_tokens
    ):
        raise UserError(f"source.max_tokens={source.max_tokens} is below source.min_tokens={source.min_tokens}")
    for group in ("model", "target_model"):
        present, dev = _select(cfg, f"{group}.device")
        planning = bool(runner.get("dry_run"))  # a dry run may plan for a GPU this machine lacks
        if present and isinstance(dev, str) and dev.startswith("cuda") and not planning:
            import torch

            if not torch.cuda.is_available():
                raise UserError(
                    f"{group}.device={dev!r} but no CUDA GPU is available here; use {group}.device=cpu or auto"
                )
