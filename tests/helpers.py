"""Test helpers in one place: runs in this process (the job function `patchscan run` calls), the
command line in a subprocess (its contract: exit codes, one-line errors, signals, multirun), and
small readers of what a run leaves behind."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pandas as pd

from patchscan.runs import parts

ROOT = Path(__file__).resolve().parents[1]
LRE = ROOT / "tests" / "fixtures" / "lre"  # small relation files the team wrote; ../shared/data/lre has the real ones
KEY = ["example_id", "method", "source_layer", "target_layer"]
SOURCES = ["The quick brown fox jumps over the lazy dog", "Hello", "Paris is the capital of France"]
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


def compose(*overrides: str):
    """The config `patchscan run OVERRIDES` would run (Hydra's compose API, the CLI's own overrides)."""
    from patchscan.cli.main import compose_config

    return compose_config(list(overrides))


def run_in(run_dir: Path, *overrides: str) -> Path:
    """`patchscan run OVERRIDES hydra.run.dir=RUN_DIR`, in this process; a UserError is raised."""
    from patchscan.cli.main import run_in_process

    run_in_process(list(overrides), run_dir)
    return run_dir


def cli(*args, cwd: Path, check: bool = True, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """`patchscan ARGS` in a subprocess, for the command line's contract."""
    proc = subprocess.run(
        [sys.executable, "-m", "patchscan.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"patchscan {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def _plain_logging():
    """Hydra's start configures logging with `dictConfig`, which closes every handler alive, pytest's
    among them (a later test then writes to a closed file). In this process one plain handler to
    stdout stands in for Hydra's `stdout` job logging, and is removed afterwards."""
    import logging

    import hydra._internal.hydra as hydra_internal
    import hydra.core.utils as hydra_utils

    root, added = logging.getLogger(), []

    def configure_log(log_config, verbose_config=False):
        if not added:
            added.append(logging.StreamHandler(sys.stdout))
            added[0].setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            root.addHandler(added[0])

    saved = hydra_utils.configure_log, hydra_internal.configure_log, root.level
    hydra_utils.configure_log = hydra_internal.configure_log = configure_log
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        hydra_utils.configure_log, hydra_internal.configure_log = saved[:2]
        root.setLevel(saved[2])
        for handler in added:
            root.removeHandler(handler)


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """`patchscan ARGS` through the same `main` in this process: its exit code, stdout and stderr as a
    subprocess would give them (an uncaught exception: code 1 and its traceback on stderr). Hydra's own
    start-up runs too (its logging set-up replaced, see `_plain_logging`): only the interpreter's
    start is saved."""
    import io
    import traceback

    from patchscan.cli.main import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _plain_logging():
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 (a traceback is what the test must see)
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["patchscan", *args], code, out.getvalue(), err.getvalue())


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The process failed with `code` and one `patchscan: ...` line (no traceback) holding every needle."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("patchscan: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(results: Path) -> pd.DataFrame:
    """A results dir's rows in a fixed order, to compare two runs."""
    return parts.read_results(results).sort_values(KEY).reset_index(drop=True)


def grid_patches(view):
    """Patches of three captured sources into two target prompts, over every (ℓ, ℓ*) pair and a middle
    target position: the grid that fast paths are checked against the naive engine on."""
    from patchscan.engine import Patch, capture

    caps = capture(view, [view.encode(s) for s in SOURCES], list(range(view.n_blocks)), [[-1, 2], [0], [3, -1]])
    target = tuple(view.encode(IDENTITY))
    other = tuple(view.encode("The capital city of x"))
    patches = []
    for c in caps:
        for j in range(len(c.positions)):
            for s in range(view.n_blocks):
                for t in range(view.n_blocks):
                    patches.append(Patch(target_ids=target, target_position=-1, target_layer=t, vector=c.states[s, j]))
                patches.append(
                    Patch(target_ids=other, target_position=2, target_layer=s, vector=c.states[s, j])
                )  # a middle position: a 3-token suffix
                patches.append(
                    Patch(target_ids=other, target_position=0, target_layer=s, vector=c.states[s, j])
                )  # position 0: no prefix at all
    return patches


def varied_stops(view, full: list[list[int]], first: int):
    """A stop on every third row, on the token at `first + k % 5` of row k's full continuation (so
    rows finish at different steps), and the full continuations cut where those stops hold."""
    from patchscan.engine.decoding import truncate_at_stop
    from patchscan.metrics.answers import StopWhenFound

    stops = [
        None if k % 3 else StopWhenFound(view.decode(t[first + k % 5 : first + 1 + k % 5]) or "?")
        for k, t in enumerate(full)
    ]
    return stops, [truncate_at_stop(view, t, s) for t, s in zip(full, stops)]
