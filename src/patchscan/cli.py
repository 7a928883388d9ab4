"""Command line: `patchscan run` (Hydra: composes configs, -m multirun) and `patchscan eval RUN_DIR`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from patchscan.errors import UserError

log = logging.getLogger("patchscan")
CONFIG_DIR = os.environ.get("PATCHSCAN_CONFIG_DIR") or str(Path(__file__).resolve().parents[2] / "configs")
USAGE = """usage: patchscan run +experiment=NAME [group=option ...] [key=value ...]   (Hydra; -m for multirun)
       patchscan eval RUN_DIR                                          (recompute metrics.json and plots)
       patchscan plan +experiment=NAME [...]                           (dry run: the work and memory, no weights)
experiments: next_token, attribute_extraction, entity_resolution, cross_model, multihop"""


def finalize(scope_cls, cfg, run_dir: Path, results_dir: Path) -> dict:
    """metrics.json, plots and the printed table, from the Parquet results alone."""
    from patchscan.runner import read_results

    df = read_results(results_dir)
    metrics = scope_cls.metrics(df, cfg)
    for png in scope_cls.plot(df, metrics, run_dir):
        metrics.setdefault("figures", []).append(str(png))
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1, default=str))
    os.replace(tmp, run_dir / "metrics.json")
    report = scope_cls.report(metrics)
    if report:
        print(report)
    print(f"results: {results_dir}\nmetrics: {run_dir / 'metrics.json'}")
    for png in metrics.get("figures", []):
        print(f"figure:  {png}")
    return metrics


def run_job(cfg) -> dict:
    """One Hydra job: scope -> model -> plan -> chunks -> Parquet -> metrics."""
    from hydra.core.hydra_config import HydraConfig

    from patchscan.engine.counting import count_work
    from patchscan.models import load_model
    from patchscan.runner import execute, plan_run, run_metadata
    from patchscan.scopes import get_scope

    name = cfg.get("experiment", {}).get("name")
    if not name or name == "???":
        raise UserError("no experiment chosen; add +experiment=NAME (next_token, attribute_extraction, "
                        "entity_resolution, cross_model, multihop)")
    scope_cls = get_scope(name)
    scope = scope_cls(cfg)  # reads and checks the data before any model is loaded
    if cfg.runner.get("dry_run"):
        return dry_run(cfg, scope)
    view = load_model(cfg.model)
    with count_work(view.model) as setup:  # model work outside the chunks (fitted maps, ...)
        scope.bind(view)
        examples = scope.examples()
    if not examples:
        raise UserError("the dataset gave no examples")
    for i, example in enumerate(examples):
        example["_index"] = i
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    plan = plan_run(cfg, run_dir, examples, run_metadata(cfg, view))
    execute(plan, scope.run_chunk, int(cfg.runner.examples_per_part), desc=name, view=view, setup=setup)
    return finalize(scope_cls, cfg, plan.run_dir, plan.results_dir)


def dry_run(cfg, scope) -> dict:
    """Print what the run would do, loading no weights (patchscan.planning)."""
    from patchscan.planning import make_plan

    if cfg.experiment.name == "cross_model":
        raise UserError("runner.dry_run is not supported for cross_model yet (it fits maps between two models)")
    plan = make_plan(cfg, scope)
    print(plan.report())
    return plan.as_dict()


def _hydra_task(cfg):
    try:
        return run_job(cfg)
    except UserError as exc:
        print(f"patchscan: error: {exc}", file=sys.stderr)
        sys.exit(2)


GROUPS = ("model", "target_model", "dataset", "patchscope", "sweep", "experiment", "hydra/launcher")
PLUGIN_LAUNCHERS = ("basic", "submitit_local", "submitit_slurm")


def check_group_choices(argv: list[str]) -> None:
    """Name an unknown config option in one line, with the valid choices, before Hydra starts."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        folder = Path(CONFIG_DIR) / key
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        if key == "hydra/launcher":
            choices = sorted(set(choices) | set(PLUGIN_LAUNCHERS))
        for option in value.split(","):
            if option and option not in choices:
                raise UserError(f"unknown {key} {option!r}; choose from {', '.join(choices)}")


def run_main(argv: list[str]) -> None:
    import hydra

    check_group_choices(argv)
    # Hydra reads flags only before the overrides; accept -m anywhere on the line.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    argv = flags + [a for a in argv if a not in flags]
    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(_hydra_task)()


def plan_main(argv: list[str]) -> None:
    """`patchscan plan OVERRIDES`: `patchscan run OVERRIDES runner.dry_run=true`, writing no run dir."""
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="patchscan-plan-")
    extra = ["runner.dry_run=true", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in argv):
        extra += [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"]
    try:
        run_main(argv + extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def eval_main(argv: list[str]) -> None:
    from omegaconf import OmegaConf

    from patchscan.runner import run_config
    from patchscan.scopes import get_scope

    parser = argparse.ArgumentParser(prog="patchscan eval", description="Recompute metrics.json and plots "
                                     "of a run from its Parquet results alone.")
    parser.add_argument("run_dir", type=Path, help="a run dir, or a results dir shared by shards")
    args = parser.parse_args(argv)
    results_dir, config = run_config(args.run_dir)
    cfg = OmegaConf.create(config)
    finalize(get_scope(cfg.experiment.name), cfg, args.run_dir, results_dir)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            run_main(rest)
        elif command == "plan":
            plan_main(rest)
        elif command == "eval":
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            eval_main(rest)
        else:
            raise UserError(f"unknown command {command!r}; use run, eval or plan")
    except UserError as exc:
        print(f"patchscan: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
