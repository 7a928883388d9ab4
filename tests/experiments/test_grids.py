"""The one block/position grammar (patchscan.grids): Python's slice semantics exactly, and one line
for what Python would do in silence (a zero step, a clipped bound, an index named twice)."""

import itertools

import pytest

from patchscan.errors import UserError
from patchscan.grids import block, blocks, layer_pairs, positions


def test_layer_specs():
    assert blocks("all", 4, "x") == [0, 1, 2, 3]
    assert blocks("last", 4, "x") == [3]
    assert blocks([0, -1], 4, "x") == [0, 3]
    assert blocks("0:10:3", 10, "x") == [0, 3, 6, 9]
    assert blocks("range(2, 8, 2)", 10, "x") == [2, 4, 6]
    assert layer_pairs("all", "same", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert layer_pairs([1], "all", 3, 3) == [(1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("spec", [[0, 12], "bogus", "0:99", [1.5]])
def test_bad_layer_specs_name_the_value(spec):
    with pytest.raises(UserError):
        blocks(spec, 4, "sweep.source_layers")


def test_positions():
    assert positions("last", 5) == [4]
    assert positions([0, -2], 5) == [0, 3]
    with pytest.raises(UserError, match="7"):
        positions([7], 5)


BOUNDS = [None, -5, -4, -3, -1, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [1, 4])
def test_slices_follow_python_exactly(n):
    """Every slice with bounds in -n..n and a non-zero step selects what range(n)[slice] does, or is
    refused as empty; a bound beyond the sequence is refused rather than clipped."""
    for start, stop, step in itertools.product(BOUNDS, BOUNDS, [None, 1, 2, 3, -1, -2]):
        text = ":".join("" if v is None else str(v) for v in (start, stop)) + ("" if step is None else f":{step}")
        expected = list(range(n)[slice(start, stop, step)])
        if any(b is not None and not -n <= b <= n for b in (start, stop)):
            with pytest.raises(UserError, match="slice bound .* is out of range"):
                blocks(text, n, "x")
        elif not expected:
            with pytest.raises(UserError, match="selects no layer"):
                blocks(text, n, "x")
        else:
            assert blocks(text, n, "x") == expected, text
            assert positions(text, n, "x") == expected, text


def test_comma_lists_mix_ints_and_slices_and_hydra_lists_may_hold_slices():
    assert blocks("0,10,20:30:2", 30, "x") == [0, 10, 20, 22, 24, 26, 28]
    assert blocks([0, "20:30:4"], 30, "x") == [0, 20, 24, 28]
    assert blocks("-2:4", 4, "x") == [2, 3] and block("last", 4) == 3


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ([1, 1], "names layer 1 twice"),
        ("0:3,1", "names layer 1 twice"),
        ([1, -3], "names layer 1 twice"),
        ("range(-2, 4)", "names layer 2 twice"),
        ("::0", "step of 0"),
        ("1:3:0", "step of 0"),
        ("range(0, 4, 0)", "step of 0"),
        ("3:1", "selects no layer"),
        ([], "selects no layer"),
        (7, r"x=7 is out of range for the model \(4 blocks: 0..3, or -4..-1 from the end\)"),
        ("0,-5", "layer -5 is out of range"),
        (True, "not valid"),
    ],
)
def test_what_python_would_do_in_silence_is_one_line(spec, needle):
    with pytest.raises(UserError, match=needle) as info:
        blocks(spec, 4, "x")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- every entry point, through its face

RUN = ["experiment=next_token", "model=tiny_llama", "dataset.limit=2", "methods=[token_identity]"]


def test_a_sweep_range_runs_pythons_blocks_once(tmp_path):
    """Issue 27 #6: `sweep.source_layers=-2:4` ran [2,3,0,1,2,3]; rows now hold blocks 2 and 3 once."""
    from tests.helpers import rows, run_in

    run = run_in(tmp_path / "run", *RUN, "sweep.source_layers=-2:4", "sweep.target_layers=same")
    df = rows(run / "results")
    assert sorted(df["source_layer"].unique()) == [2, 3]
    assert not df.duplicated(["example_id", "method", "source_layer", "target_layer"]).any()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("sweep.source_layers=[1,1]", "names layer 1 twice"),
        ("sweep.source_layers='0:3,1'", "names layer 1 twice"),
        ("sweep.source_layers=::0", "step of 0"),
        ("sweep.target_layers=1:3:0", "step of 0"),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_run_and_plan_refuse_a_bad_grid_in_one_line(tmp_path, command, override, needle):
    from tests.helpers import cli_here, one_line_error

    proc = cli_here(command, *RUN, override, f"hydra.run.dir={tmp_path / 'run'}")
    one_line_error(proc, "patchscan: error:", needle)
    assert not list((tmp_path / "run").glob("results/part-*"))


def test_inspect_refuses_a_zero_step_and_a_block_named_twice():
    from tests.helpers import cli_here, one_line_error

    for spec, needle in (("::0", "--layers='::0': a slice step of 0"), ("0:3,1", "names layer 1 twice")):
        proc = cli_here("inspect", "--model", "tiny_llama", "--device", "cpu", "--text", "Paris", "--layers", spec)
        one_line_error(proc, needle)


def test_show_refuses_blocks_the_run_lacks_and_a_zero_step(tmp_path):
    """Issue 27 #8: `show --layers 1` on a run without block 1 printed an empty table, exit 0."""
    from tests.helpers import cli_here, one_line_error, run_in

    run = run_in(tmp_path / "run", *RUN, "sweep.source_layers=[0,2]", "sweep.target_layers=same")
    one_line_error(cli_here("show", str(run), "--example", "0", "--layers", "1"), "the run has blocks ℓ = 0, 2")
    one_line_error(cli_here("show", str(run), "--example", "0", "--layers", "::0"), "step of 0")
    shown = cli_here("show", str(run), "--example", "0", "--layers=-2:")  # blocks 2, 3 of 4: the run has 2
    assert shown.returncode == 0 and [line.split()[0] for line in shown.stdout.splitlines()[3:]] == ["2"]


def test_the_api_takes_the_grammar_and_refuses_a_duplicate():
    import patchscan as ps
    from tests.conftest import tiny

    lm = tiny("tiny_llama")
    src = ps.capture(lm, "The Eiffel Tower", layers="-2:", positions="last")
    assert src.layers == [2, 3] and src.positions == [len(src.token_ids) - 1]
    assert src.at(layer="last").layer == 3 and src.at(layer=-2).layer == 2
    target = ps.TargetPrompt(lm, "x")
    assert [(p.source.layer, p.target_layer) for p in target.grid(src, "last", "0:4:3")] == [(3, 0), (3, 3)]
    for call, needle in (
        (lambda: ps.capture(lm, "Paris", layers=[1, 1]), "layers=\\[1, 1\\] names layer 1 twice"),
        (lambda: ps.capture(lm, "Paris is big", positions=[0, -3]), "names position 0 twice"),
        (lambda: ps.capture(lm, "Paris", layers="::0"), "step of 0"),
        (lambda: target.grid(src, target_layers=[0, 0]), "target_layers=\\[0, 0\\] names layer 0 twice"),
        (lambda: src.at(layer="all"), "selects 4 layers"),
    ):
        with pytest.raises(ps.UserError, match=needle):
            call()
