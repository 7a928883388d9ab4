"""The command line refuses what it cannot do right, in one line, and touches nothing it promises not to
(issue 27: Hydra's own errors, random_pairs, empty selections, dropped input, plan, eval --out, a
refused run's leftovers, eval on a full disk or a read-only dir)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import LRE, cli, cli_here, compose, one_line_error, run_in, snapshot

TINY = ["experiment=next_token", "model=tiny_llama", "dataset.limit=2", "methods=[logit_lens]"]
ATTR = [
    "experiment=attribute_extraction",
    "model=tiny_llama",
    "sweep.source_layers=[0]",
    "sweep.target_layers=[0]",
    "probe.enabled=false",
    "controls=[]",
    "generation.max_new_tokens=2",
]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished tiny run (2 examples, one method)."""
    run = tmp_path_factory.mktemp("done") / "run"
    run_in(run, *TINY)
    return run


# ---------------------------------------------------------------- Hydra's own errors


HYDRA_ERRORS = {
    "unknown key": (["runner.bogus=1"], ["runner.bogus"]),
    "empty group": (["model="], ["unknown model ''", "tiny_llama"]),
    "grammar": (["sweep.source_layers=[1,"], ["cannot parse the override", "sweep.source_layers=[1,"]),
    "unknown key, multirun": (["-m", "runner.bogus=1,2"], ["runner.bogus"]),
}


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", list(HYDRA_ERRORS))
def test_hydra_errors_are_one_line_and_exit_2(tmp_path, command, case):
    args, needles = HYDRA_ERRORS[case]
    where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    proc = cli_here(command, *TINY, *args, f"{where}={tmp_path / 'run'}")
    one_line_error(proc, *needles)
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert not (tmp_path / "run").exists()


def test_hydra_error_in_a_subprocess_exits_2(tmp_path):
    """The process's own exit code and stderr (Hydra's printing would give exit 1 and five lines)."""
    proc = cli("run", *TINY, "runner.bogus=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    one_line_error(proc, "runner.bogus")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# ---------------------------------------------------------------- refused at once


def test_random_pairs_beyond_the_vocabulary_is_refused_at_once(tmp_path):
    start = time.monotonic()
    proc = cli_here("run", *TINY[:3], "methods=[token_identity]", "patchscope.random_pairs=10000000",
                    f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    one_line_error(proc, "patchscope.random_pairs=10000000 is more than the 39070 usable words")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (TINY[:3] + ["methods=[]"], "methods=[] is not valid; use a non-empty list"),
        (TINY[:3] + ["methods=token_identity"], "methods='token_identity' is not valid"),
        (ATTR + [f"dataset.path={LRE}", "dataset.relations=[]"], "dataset.relations=[] is not valid"),
    ],
)
def test_an_empty_selection_is_refused(tmp_path, args, needle):
    one_line_error(cli_here("run", *args, f"hydra.run.dir={tmp_path / 'run'}"), needle)
    assert not (tmp_path / "run").exists()


def test_controls_empty_still_means_no_controls():
    """`controls=[]` (the Makefile's figure runs) is a choice, not an empty selection."""
    from patchscan.runs.config_checks import validate

    validate(compose(*ATTR, f"dataset.path={LRE}"))


# ---------------------------------------------------------------- dropped input is counted


def _lre_with_bad_samples(folder: Path, good: bool = True) -> Path:
    folder.mkdir()
    data = json.loads((LRE / "country_capital_city.json").read_text())
    bad = [{"subject": "Peru"}, {"subject": 5, "object": "Lima"}, {"subject": "Chile", "object": ["x"]}, "Cuba"]
    data["samples"] = (data["samples"][:2] if good else []) + bad
    (folder / "country_capital_city.json").write_text(json.dumps(data))
    return folder


def test_dropped_lre_samples_are_counted_in_the_log_and_metrics(tmp_path):
    lre = _lre_with_bad_samples(tmp_path / "lre")
    run = tmp_path / "run"
    proc = cli_here("run", *ATTR, f"dataset.path={lre}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dropped = json.loads((run / "metrics.json").read_text())["dropped"]
    assert dropped == {
        "LRE samples whose 'subject' is not text": 1,
        "LRE samples whose 'object' is not text": 1,
        "LRE samples without 'object'": 1,
        "LRE samples that are not a JSON object": 1,
    }
    assert "left out 4 inputs" in proc.stdout + proc.stderr
    assert "LRE samples without 'object'" in (run / "cli.log").read_text()


def test_nothing_left_after_dropping_is_refused_naming_why(tmp_path):
    lre = _lre_with_bad_samples(tmp_path / "lre", good=False)
    proc = cli_here("run", *ATTR, f"dataset.path={lre}", f"hydra.run.dir={tmp_path / 'run'}")
    one_line_error(proc, "no relation samples found", "1 LRE samples without 'object'")
    assert not (tmp_path / "run").exists()


def test_texts_shorter_than_min_tokens_are_counted(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("Hi\nThe quick brown fox jumps over the lazy dog\nOk\nParis is the capital of France\n")
    run = tmp_path / "run"
    args = [*TINY[:2], "methods=[logit_lens]", "dataset=text", f"dataset.path={texts}", "source.min_tokens=4"]
    proc = cli_here("run", *args, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dropped"] == {"texts shorter than 4 tokens (source.min_tokens, source.min_position)": 2}
    assert metrics["examples_stored"] == 2
    (run / "metrics.json").unlink()
    assert cli_here("eval", str(run)).returncode == 0  # eval keeps the count: it is in _run.json
    assert json.loads((run / "metrics.json").read_text())["dropped"] == metrics["dropped"]
    proc = cli_here("run", *args, "source.min_tokens=100", "source.max_tokens=200", f"hydra.run.dir={tmp_path / 'r2'}")
    one_line_error(proc, "source.min_tokens=100", "4 texts left out")
    assert not (tmp_path / "r2").exists()


def test_a_run_that_drops_nothing_says_so(done):
    assert json.loads((done / "metrics.json").read_text())["dropped"] == {}


# ---------------------------------------------------------------- touching nothing it promises not to


def test_plan_loads_no_weights_and_writes_nothing(tmp_path, monkeypatch):
    """An empty model cache stays empty (the built-in tokenizer is read from the GGUF), and the run
    dir the plan was pointed at is not made."""
    cache = tmp_path / "models"
    cache.mkdir()
    monkeypatch.setenv("PATCHSCAN_MODEL_CACHE", str(cache))
    proc = cli_here("plan", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plan (dry run, no weights loaded)" in proc.stdout
    assert list(cache.iterdir()) == [] and not (tmp_path / "run").exists()


def test_eval_refuses_an_out_dir_inside_the_results(done):
    before = snapshot(done)
    proc = cli_here("eval", str(done), "--out", str(done / "results" / "sub"))
    one_line_error(proc, "never into it", "results/sub")
    assert snapshot(done) == before and not (done / "results" / "sub").exists()


def test_a_refused_run_leaves_no_dir_and_no_lock(tmp_path):
    """Refused after the run dir and the shard lock were made (a block the model lacks): both go."""
    proc = cli_here("run", *TINY, "sweep.source_layers=[9]", f"hydra.run.dir={tmp_path / 'a' / 'run'}")
    one_line_error(proc, "layer 9 is out of range")
    shared = tmp_path / "shared"
    proc = cli_here(
        "run", *TINY, "sweep.source_layers=[9]", f"runner.results_dir={shared}", f"hydra.run.dir={tmp_path / 'b'}"
    )
    one_line_error(proc, "layer 9 is out of range")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="layer 9"):  # the job function alone: the runner removes its lock
        run_in(tmp_path / "c", *TINY, "sweep.source_layers=[9]")
    assert not (tmp_path / "c" / "results").exists()


def test_a_refused_run_keeps_what_was_there(done, tmp_path):
    """A refusal removes only what it made: a run dir that held a run keeps every file."""
    run = shutil.copytree(done, tmp_path / "run")
    before = snapshot(run)
    one_line_error(cli_here("run", *TINY, "sweep.source_layers=[9]", f"hydra.run.dir={run}"), "different config")
    assert snapshot(run) == before


# ---------------------------------------------------------------- eval on a full disk or a read-only dir


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k"):
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("needs root and mount (a tiny tmpfs)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_eval_on_a_full_disk_is_one_line(done, tmp_path):
    with tmpfs(tmp_path / "full") as full:
        filler = full / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as fh:
            fh.write(b"\0" * 1_000_000)
        proc = cli_here("eval", str(done), "--out", str(full / "out"))
        one_line_error(proc, "cannot write", "No space left on device", "untouched")


def test_eval_of_a_read_only_run_dir_is_one_line(done, tmp_path):
    with tmpfs(tmp_path / "ro", size="8m") as ro:
        run = shutil.copytree(done, ro / "run")
        (run / "metrics.json").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        proc = cli_here("eval", str(run))
        one_line_error(proc, "cannot write", "Read-only file system")


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_generation_that_cannot_fit_is_refused_before_the_run_dir(tmp_path, command):
    """`max_new_tokens=1000000000` (a 128 GB allocation once the run had started): the dry run's memory
    estimate refuses it, in one line, before any run dir is accepted, and before a plan counts it."""
    run = tmp_path / "run"
    proc = cli_here(
        command, *ATTR, f"dataset.path={LRE}", "generation.max_new_tokens=1000000000", f"hydra.run.dir={run}"
    )
    one_line_error(proc, "generation.max_new_tokens=1000000000", "GiB")
    assert list(tmp_path.iterdir()) == []
