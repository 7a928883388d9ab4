"""Command line: `patchscan run` (Hydra: composes configs, -m multirun) and `patchscan eval RUN_DIR`."""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import logging
import os
import sys
from pathlib import Path

from patchscan.errors import UserError
from patchscan.paths import config_dir

log = logging.getLogger("patchscan")


CONFIG_DIR = str(config_dir())
USAGE = """usage: patchscan run experiment=NAME [group=option ...] [key=value ...]    (Hydra; -m for multirun)
       patchscan eval RUN_DIR [--out DIR]                              (recompute metrics.json and plots)
       patchscan plan experiment=NAME [...]                            (dry run: the work and memory, no weights)
       patchscan inspect --text TEXT [--model M] [--scope S | --target T] [--layers 0:10]   (one line per block)
       patchscan show RUN_DIR --example ID [--method M] [--layers 0:10]  (the same view from a run's rows)
experiments: next_token, attribute_extraction, entity_resolution, cross_model, multihop"""


def _name_local_model(cfg, overrides: list[str]) -> None:
    """A model read from a folder, a GGUF file or another hub id gets its own name in rows and caches,
    not the name of the config group it was set over (unless model.name is given)."""
    from omegaconf import open_dict

    for group in ("model", "target_model"):
        node = cfg.get(group)
        if node is None or any(o.lstrip("+~").startswith(f"{group}.name=") for o in overrides):
            continue
        given = {o.lstrip("+~").partition("=")[0] for o in overrides}
        source = node.get("source")
        name = None
        if source in ("folder", "gguf") and node.get("path") and f"{group}.path" in given:
            path = Path(str(node.path))
            name = path.stem if source == "gguf" else path.name
        elif source == "hub" and node.get("id") and f"{group}.id" in given:
            name = str(node.id)
        if name:
            with open_dict(cfg):
                node.name = name


class Interrupted(BaseException):
    """Ctrl-C during a run, with the line to print."""


def run_job(cfg) -> dict:
    """One Hydra job: check -> lock -> scope -> model -> plan -> chunks -> Parquet -> metrics."""
    from hydra.core.hydra_config import HydraConfig

    from patchscan.data import drops
    from patchscan.engine.counting import count_work
    from patchscan.experiments import get_experiment
    from patchscan.models import load_model
    from patchscan.runs.config_checks import validate
    from patchscan.runs.dry_run import check_fits
    from patchscan.runs.identity import run_metadata
    from patchscan.runs.runner import execute, finalize, open_run, plan_run

    name = cfg.get("experiment", {}).get("name")
    if not name or name == "???":
        raise UserError(
            "no experiment chosen; add experiment=NAME (next_token, attribute_extraction, "
            "entity_resolution, cross_model, multihop)"
        )
    hydra_cfg = HydraConfig.get()
    _name_local_model(cfg, list(hydra_cfg.overrides.task))
    validate(cfg)
    scope_cls = get_experiment(name)
    scope = scope_cls(cfg)  # reads and checks the data before any model is loaded
    views = check_fits(cfg)  # the dry run's memory estimate refuses a generation that cannot fit, before any run dir
    if cfg.runner.get("dry_run"):
        return dry_run(cfg, scope, views)
    plan = open_run(cfg, Path(hydra_cfg.runtime.output_dir))  # refuses a different config or a second writer
    try:
        view = load_model(cfg.model)
        with count_work(view.model) as setup:  # model work outside the chunks (fitted maps, ...)
            scope.bind(view)
            examples = scope.examples()
        if not examples:
            raise UserError(drops.nothing_left("the dataset gave no examples", scope.dropped))
        meta = {**run_metadata(cfg, view), "dropped": drops.counts(scope.dropped)}  # into metrics.json too
        plan = plan_run(plan, examples, meta, repair=bool(cfg.runner.get("repair")))
        _accept(plan.run_dir, cfg, hydra_cfg)
        drops.report(scope.dropped)  # in the run's log file
        try:
            execute(
                plan,
                scope.run_chunk,
                int(cfg.runner.examples_per_part),
                desc=name,
                view=view,
                setup=setup,
                target_view=scope.target_view,  # cross_model's M*: its work is counted too
            )
            return finalize(scope_cls, cfg, plan.run_dir, plan.results_dir)
        except KeyboardInterrupt:
            raise Interrupted(plan.interrupted()) from None
    finally:
        plan.release()


def _accept(run_dir: Path, cfg, hydra_cfg) -> None:
    """Once a run is accepted: its composed config in .hydra/ and its log file (Hydra writes neither, so a
    refused run touches nothing)."""
    from omegaconf import OmegaConf

    from patchscan.runs.store import write_atomic

    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    write_atomic(hydra_dir / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    write_atomic(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))
    handler = logging.FileHandler(run_dir / f"{hydra_cfg.job.name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    _LOG_HANDLERS.append(handler)


_LOG_HANDLERS: list[logging.Handler] = []
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit: 2 for a user's mistake, 130 for Ctrl-C."""
    print(f"patchscan: {message}", file=sys.stderr)
    sys.exit(code)


def write_error(exc: OSError, kept: str) -> str:
    """The one line for a write the filesystem refused (disk full, read-only, no permission): what
    could not be written and what is `kept`. Any other OSError is raised again."""
    if exc.errno not in WRITE_ERRNOS:
        raise exc
    return f"error: cannot write {exc.filename or 'a file'}: {exc.strerror}; {kept}"


def dry_run(cfg, scope, views: dict | None = None) -> dict:
    """Print what the run would do, loading no weights (patchscan.runs.dry_run); `views`: the counting
    views check_fits built."""
    from patchscan.runs.dry_run import make_plan

    plan = make_plan(cfg, scope, views)
    print(plan.report())
    return plan.as_dict()


def _hydra_task(cfg):
    try:
        result = run_job(cfg)
        if cfg.get("runner", {}).get("dry_run"):  # a plan writes nothing but its report
            leave_as_found()
        return result
    except UserError as exc:
        leave_as_found()
        fail(f"error: {exc}")
    except Interrupted as exc:
        fail(str(exc), 130)
    except KeyboardInterrupt:
        fail("interrupted before any example ran; nothing was saved", 130)
    except OSError as exc:
        fail(write_error(exc, "the examples saved so far are kept: fix this and rerun the same command to resume"))
    finally:
        for handler in _LOG_HANDLERS:
            logging.getLogger().removeHandler(handler)
            handler.close()
        _LOG_HANDLERS.clear()


GROUPS = ("model", "target_model", "dataset", "patchscope", "sweep", "experiment", "hydra/launcher")
PLUGIN_LAUNCHERS = ("basic", "submitit_local", "submitit_slurm")


def check_group_choices(argv: list[str]) -> None:
    """Name an unknown config option in one line, with the valid choices, before Hydra starts."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        folder = Path(CONFIG_DIR) / key
        choices = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))  # _hub: bases
        if key == "hydra/launcher":
            choices = sorted(set(choices) | set(PLUGIN_LAUNCHERS))
        for option in value.split(","):
            if option not in choices:  # an empty one too: `model=` names no config
                raise UserError(f"unknown {key} {option!r}; choose from {', '.join(choices)}")


# model keys docs/models.md documents that a model config may lack: given as model.KEY=..., Hydra would want a +
OPTIONAL_MODEL_KEYS = ("path", "id", "revision", "trust_remote_code")


def _open_model_keys(argv: list[str]) -> list[str]:
    """`model.path=DIR` works as written: such keys are added when the chosen model config lacks them."""
    out = []
    for arg in argv:
        key = arg.partition("=")[0]
        group, _, leaf = key.partition(".")
        if group in ("model", "target_model") and leaf in OPTIONAL_MODEL_KEYS and "=" in arg:
            arg = "++" + arg
        out.append(arg)
    return out


_FOUND: list[Path] = []  # the deepest dir on the way to the output dir that existed before this command
_MADE: list[Path] = []  # the output dir `_check_output_dirs` made sure of


def _check_output_dirs(argv: list[str]) -> None:
    """The run dir must be creatable: one line, not Hydra's traceback, when it is not."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    wanted = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = next((a.partition("=")[2] for a in argv if a.lstrip("+").partition("=")[0] == wanted), None)
    value = value.strip().strip("'\"") if value else value
    target = Path(value) if value and "$" not in value else Path("outputs")
    _FOUND[:] = [next(p for p in [target.absolute(), *target.absolute().parents] if p.exists())]
    _MADE[:] = [target]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the output dir {target}: {exc.strerror}; choose a writable {wanted}=..."
        ) from exc


def leave_as_found() -> None:
    """A refused run or a dry run leaves the filesystem as it found it: the job's output dir, made by
    Hydra or `_check_output_dirs`, is removed with the empty dirs above it, up to the one that existed
    before the command (a dir that holds anything stays)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        _prune(Path(HydraConfig.get().runtime.output_dir))


def _prune(folder: Path) -> None:
    """Remove `folder` and the dirs above it while they are empty, up to the one in `_FOUND`."""
    folder = folder.absolute()
    while _FOUND and _FOUND[0] in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _experiment_override(argv: list[str]) -> list[str]:
    """`+experiment=NAME` (the older spelling) means `experiment=NAME`: the root config now holds an
    `experiment: null` slot, and Hydra refuses to add a second one."""
    return [a.lstrip("+") if a.lstrip("+").startswith("experiment=") else a for a in argv]


def hydra_overrides(argv: list[str]) -> list[str]:
    """The overrides Hydra gets for a command line (flags such as -m dropped): unknown config options
    named in one line first, `model.path=DIR` opened, `+experiment=` accepted."""
    check_group_choices(argv)
    return _open_model_keys(_experiment_override([a for a in argv if a not in ("-m", "--multirun")]))


@contextlib.contextmanager
def hydra_errors():
    """Hydra's own errors (an unknown key, an override it cannot parse, a missing config) as one
    UserError line, not Hydra's five lines and exit 1. HYDRA_FULL_ERROR makes Hydra raise them
    rather than print them; it is set only while Hydra runs here."""
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except OverrideParseException as exc:
        raise UserError(f"cannot parse the override {exc.override!r}: {_one_line(exc.message)}") from None
    except (HydraException, OmegaConfBaseException) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
        parts = [_one_line(str(exc))] + ([_one_line(str(cause))] if cause else [])
        raise UserError("; ".join(p for p in parts if p)) from None
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def _one_line(message: str) -> str:
    """A Hydra or OmegaConf message on one line: its lines up to a blank one (lists of options and
    the full_key/object_type details left out), joined."""
    lines = []
    for line in message.strip().splitlines():
        if not line.strip() or line.startswith((" ", "\t")):
            break
        lines.append(line.strip().rstrip("."))
    return "; ".join(lines)


def run_main(argv: list[str]) -> None:
    import hydra

    overrides = hydra_overrides(argv)
    _check_output_dirs(argv)
    # Hydra reads flags only before the overrides; accept -m anywhere on the line.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    sys.argv = [sys.argv[0]] + flags + overrides
    try:
        with hydra_errors():
            hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(_hydra_task)()
    except (UserError, SystemExit) as exc:  # refused by Hydra, or a job refused
        if isinstance(exc, UserError) or exc.code:
            _undo_output_dirs()
        raise


def _undo_output_dirs() -> None:
    """After a refusal: the output dir `_check_output_dirs` made goes again, if nothing of a run is
    there (a sweep dir this command made that holds only Hydra's multirun.yaml counts as empty)."""
    for folder in _MADE:
        made_here = _FOUND and _FOUND[0] != folder.absolute()
        if made_here and folder.is_dir() and [p.name for p in folder.iterdir()] == ["multirun.yaml"]:
            (folder / "multirun.yaml").unlink()
        _prune(folder)


def compose_config(argv: list[str], run_dir: str | Path | None = None):
    """The config `patchscan run ARGV` would run, composed in this process with Hydra's compose API;
    with `run_dir`, Hydra's own config is kept (and made current) so that `run_job` can run it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    overrides = hydra_overrides(argv)
    with hydra_errors(), initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=run_dir is not None)
    if run_dir is None:
        return cfg
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "cli"  # as configs/config.yaml names it: the log file is cli.log
    HydraConfig.instance().set_config(cfg)
    task = copy.deepcopy(cfg)  # as Hydra's own run_job: the job sees its config without the hydra node
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def run_in_process(argv: list[str], run_dir: str | Path) -> dict:
    """`patchscan run ARGV hydra.run.dir=RUN_DIR` in this process (tests): the same job function, whose
    UserError is raised rather than printed. Returns the job's metrics (or a dry run's plan)."""
    cfg = compose_config(argv, run_dir)
    try:
        return run_job(cfg)
    finally:
        for handler in _LOG_HANDLERS:
            logging.getLogger().removeHandler(handler)
            handler.close()
        _LOG_HANDLERS.clear()


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

    from patchscan.experiments import get_experiment
    from patchscan.runs.parts import run_config
    from patchscan.runs.runner import finalize

    parser = argparse.ArgumentParser(
        prog="patchscan eval", description="Recompute metrics.json and plots of a run from its Parquet results alone."
    )
    parser.add_argument("run_dir", type=Path, help="a run dir, or a results dir shared by shards")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where metrics.json and the figures go (default: "
        "the run dir, or beside a results dir given directly; never into the results dir)",
    )
    args = parser.parse_args(argv)
    results_dir, config = run_config(args.run_dir)
    out = args.out or (results_dir.parent if results_dir.resolve() == args.run_dir.resolve() else args.run_dir)
    cfg = OmegaConf.create(config)
    try:
        finalize(get_experiment(cfg.experiment.name), cfg, out, results_dir)
    except OSError as exc:
        fail(write_error(exc, f"the results in {results_dir} are untouched: fix this, or choose --out DIR, and rerun"))


def main(argv: list[str] | None = None) -> None:
    """The `patchscan` command: ARGV, else the process's command line (then its exit is shortened,
    patchscan.runs.shutdown)."""
    if argv is None:
        dispatch(sys.argv[1:])
        from patchscan.runs.shutdown import skip_final_collection

        skip_final_collection()
    else:
        dispatch(argv)


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            run_main(rest)
        elif command == "plan":
            plan_main(rest)
        elif command in ("inspect", "show"):
            from patchscan.cli.inspect import inspect_main, show_main

            (inspect_main if command == "inspect" else show_main)(rest)
        elif command == "eval":
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            eval_main(rest)
        else:
            raise UserError(f"unknown command {command!r}; use run, eval, plan, inspect or show")
    except UserError as exc:
        fail(f"error: {exc}")
    except KeyboardInterrupt:
        fail("interrupted", 130)


if __name__ == "__main__":
    main()
