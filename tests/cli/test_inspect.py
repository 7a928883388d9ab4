"""`patchscan inspect` and `patchscan show`: the Table 3 view (one line per block) from a text, and
from a finished run's rows; one-line errors for bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from patchscan.cli.inspect import inspect_main, one_line, show_main, show_view
from patchscan.errors import UserError
from patchscan.grids import blocks
from tests.conftest import tiny
from tests.helpers import cli, cli_here, run_in
from tests.reference import naive_generate


def view_lines(view: str) -> list[list[str]]:
    """The block lines of a view: [ℓ, (ℓ*,) text]."""
    body = view.splitlines()[3:]
    return [line.split(None, 2 if "ℓ*" in view.splitlines()[2] else 1) for line in body]


def test_long_prompts_are_shortened_at_word_boundaries():
    from patchscan.cli.inspect import shorten

    long = "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean corporation, x"
    assert shorten(long) == "Syria: Country in the Middle ... South Korean corporation, x"
    assert shorten("a\nb") == "a\\nb"


def parse_block_list(spec: str, n_blocks: int) -> list[int]:
    return blocks(spec, n_blocks, "--layers")


def test_block_lists_take_slices_lists_and_names():
    assert parse_block_list("0:10", 30) == list(range(10))
    assert parse_block_list("::10", 30) == [0, 10, 20]
    assert parse_block_list("3", 30) == [3] and parse_block_list("0, 5,-1", 30) == [0, 5, 29]
    assert parse_block_list("all", 4) == [0, 1, 2, 3] and parse_block_list("last", 4) == [3]
    for bad, needle in (
        ("0:40", "slice bound 40 is out of range"),
        ("7", "layer 7"),
        ("a:b", "'a:b'"),
        ("one", "'one'"),
        ("5:2", "no layer"),
    ):
        with pytest.raises(UserError, match=needle):
            parse_block_list(bad, 30 if ":" in bad else 4)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_inspect_prints_one_line_per_block_equal_to_the_plain_method(model, capsys):
    """Each line is the greedy continuation of the target prompt with the text's last-token state
    patched at that block: recomputed here with the naive engine (plain HF calls, one at a time)."""
    import patchscan as ps

    view = inspect_main(["--model", model, "--device", "cpu", "--text", "The Eiffel Tower", "--scope",
                         "token_identity", "--layers", "0,2:4", "--max-new-tokens", "3"])  # fmt: skip
    assert capsys.readouterr().out.strip() == view.strip()
    lines = view_lines(view)
    assert [int(b) for b, _ in lines] == [0, 2, 3]
    lm = tiny(model)
    target = ps.TargetPrompt.named(lm, "token_identity")
    source = ps.capture(lm, "The Eiffel Tower", layers=[0, 2, 3], positions=[-1])
    for (_, text), layer in zip(lines, (0, 2, 3)):
        patch = target.patch(source.at(layer=layer), layer=layer)
        expected = lm.tokenizer.decode(naive_generate(lm, patch, 3))
        assert text.strip() == one_line(expected).strip()


def test_inspect_with_a_target_of_ones_own(capsys):
    view = inspect_main(["--model", "tiny_neox", "--device", "cpu", "--text", "France",
                         "--target", "The capital city of x", "--layers", "1:3", "--max-new-tokens", "2"])  # fmt: skip
    assert (
        "'The capital city of x' at token " in view
        and "(' x')" in view
        and [b for b, _ in view_lines(view)] == ["1", "2"]
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--scope", "nope"], "unknown scope 'nope'; choose from entity_description, token_identity"),
        (["--layers", "0:99"], "slice bound 99 is out of range"),
        (["--layers", "x"], "--layers='x' is not valid"),
        (["--scope", "token_identity", "--target", "The x"], "--scope or --target, not both"),
        (["--target", "no placeholder"], "does not contain the placeholder 'x'"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["--position", "9"], "--position=9 is out of range for 'Paris'"),
        (["--layers"], "--layers: expected one argument"),
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    ],
)
def test_inspect_bad_input_is_one_line(args, needle):
    proc = cli_here("inspect", "--model", "tiny_llama", "--device", "cpu", "--text", "Paris", *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("patchscan: error:") and needle in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def entity_run(tmp_path_factory):
    return run_in(
        tmp_path_factory.mktemp("show") / "run",
        "experiment=entity_resolution",
        "model=tiny_neox",
        "dataset.limit=3",
        "sweep.source_layers=[0,1,3]",
        "generation.max_new_tokens=4",
        "similarity.embedding=false",
        "controls=[]",  # the Patchscope's rows alone (the default zero and mean controls add rows per block)
    )


def test_show_prints_the_rows_of_one_example(entity_run):
    df = pd.read_parquet(entity_run / "results").query("example_id == '1'").sort_values("source_layer")
    view = show_view(entity_run, "1")
    assert f"'{df['subject'].iloc[0]}'" in view.splitlines()[1]
    lines = view_lines(view)
    assert [int(b) for b, _ in lines] == [0, 1, 3]
    assert [t for _, t in lines] == [g.replace("\n", "\\n").strip() for g in df["generation"]]
    assert [b for b, _ in view_lines(show_view(entity_run, "1", layers="1:4"))] == ["1", "3"]


def test_show_a_next_token_grid_names_both_blocks(tmp_path):
    run = run_in(tmp_path / "run", "experiment=next_token", "model=tiny_llama", "dataset.limit=2",
                 "methods=[token_identity]", "sweep.target_layers=all", "sweep.source_layers=[1,2]")  # fmt: skip
    view = show_view(run, "0")
    assert "method token_identity" in view and "ℓ*" in view.splitlines()[2]
    df = pd.read_parquet(run / "results").query("example_id == '0'").sort_values(["source_layer", "target_layer"])
    lines = [line.split(None, 2) for line in view.splitlines()[3:]]
    assert [(int(s), int(t)) for s, t, _ in lines] == list(zip(df["source_layer"], df["target_layer"]))


def test_show_bad_input_is_one_line(entity_run, tmp_path):
    with pytest.raises(UserError, match=r"no example '99' in .*; its examples are 0, 1, 2$"):
        show_main([str(entity_run), "--example", "99"])
    with pytest.raises(UserError, match="no rows of method 'bogus' for example '0'; choose from patchscope"):
        show_main([str(entity_run), "--example", "0", "--method", "bogus"])
    with pytest.raises(UserError, match="no run dir"):
        show_main([str(tmp_path / "missing"), "--example", "0"])
    with pytest.raises(UserError, match="not a patchscan run dir"):
        show_main([str(tmp_path), "--example", "0"])
    with pytest.raises(UserError, match="the following arguments are required: --example"):
        show_main([str(entity_run)])


def test_the_commands_from_a_shell(entity_run, tmp_path):
    """The CLI contract: both commands print the view and exit 0; a bad value is one line and exit 2."""
    out = cli("inspect", "--model", "tiny_llama", "--device", "cpu", "--text", "Paris", "--layers", "0:2",
              "--max-new-tokens", "2", cwd=tmp_path)  # fmt: skip
    assert len(view_lines(out.stdout.strip())) == 2
    shown = cli("show", str(entity_run), "--example", "2", cwd=tmp_path)
    assert shown.stdout.strip() == show_view(entity_run, "2")
    bad = cli("show", str(entity_run), "--example", "7", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("patchscan: error: no example '7'")


def test_docstring_examples_run():
    import doctest

    import patchscan.cli.inspect

    result = doctest.testmod(patchscan.cli.inspect, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
