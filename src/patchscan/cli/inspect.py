"""`patchscan inspect` and `patchscan show`: the paper's Table 3 view in a terminal, one line per block.

`inspect` reads one text with a Patchscope, no config needed: the text's last-token state at each
block ℓ is patched into the target prompt at the same block (ℓ* = ℓ) and the model's greedy
continuation is printed. It is the public API end to end (`load_model`, `capture`, `TargetPrompt`,
`generate`). `show` prints the same view from a finished run's Parquet rows. Both read --layers
by the one block grammar of `patchscan.grids`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from patchscan import grids
from patchscan.errors import UserError

# The target prompts --scope names (configs/patchscope/NAME.yaml, the ones with one prompt).
TARGET_PROMPTS = ("entity_description", "token_identity")


def one_line(text: str) -> str:
    """A generation on one terminal line: newlines and tabs shown as escapes."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def shorten(text: str, width: int = 72) -> str:
    """One line of at most about `width` characters: its start and its end (where the placeholder is)."""
    text = one_line(text)
    if len(text) <= width:
        return text
    head, tail = text[: width // 2 - 3], text[-(width // 2 - 2) :]
    head = head[: head.rfind(" ")] if " " in head else head  # whole words on both sides
    tail = tail[tail.find(" ") + 1 :] if " " in tail else tail
    return f"{head} ... {tail}"


def render(header: Sequence[str], cells: Sequence[tuple[int, int, str]]) -> str:
    """The view: header lines, then `ℓ  ℓ*  text` per cell (ℓ* only where it differs from ℓ somewhere)."""
    both = any(s != t for s, t, _ in cells)
    lines = list(header) + ["    ℓ   ℓ*  generation" if both else "    ℓ  generation"]
    for s, t, text in cells:
        lines.append(f"{s:5d} {t:4d}  {one_line(text)}" if both else f"{s:5d}  {one_line(text)}")
    return "\n".join(lines)


def target_prompt(lm, scope: str | None, target: str | None, placeholder: str | None, occurrence: int | None = None):
    """The target prompt of --scope NAME, or --target TEXT with its placeholder (default x)."""
    import patchscan as ps

    if target is not None:
        return ps.TargetPrompt(lm, target, placeholder=placeholder or "x", occurrence=occurrence)
    scope = scope or "entity_description"
    if scope not in TARGET_PROMPTS:
        raise UserError(f"unknown scope {scope!r}; choose from {', '.join(TARGET_PROMPTS)}, or give --target TEXT")
    prompt = ps.TargetPrompt.named(lm, scope)
    if placeholder or occurrence is not None:
        return ps.TargetPrompt(lm, prompt.text, placeholder=placeholder or prompt.placeholder, occurrence=occurrence)
    return prompt


def inspect_text(lm, text: str, target, layers: Sequence[int], max_new_tokens: int = 20, position: int = -1):
    """[(ℓ, ℓ, generation)] for the state of `text` at `position` of each block ℓ patched into `target` at ℓ.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")
    >>> target = ps.TargetPrompt.named(lm, "token_identity")
    >>> [(s, t) for s, t, _ in inspect_text(lm, "Paris", target, [0, 3], max_new_tokens=2)]
    [(0, 0), (3, 3)]
    """
    import patchscan as ps

    source = ps.capture(lm, text, layers=list(layers), positions=[position])
    patches = [target.patch(source.at(layer=layer), layer=layer) for layer in layers]
    result = ps.generate(lm, patches, max_new_tokens=max_new_tokens)
    return [(layer, layer, generated) for layer, generated in zip(layers, result.texts)]


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one UserError line (exit 2), not a usage block."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchscan inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("--text", required=True, help="the source text; its last token's state is read")
    parser.add_argument("--model", default="smollm2_135m", help="a config name, hub id ORG/NAME, folder or .gguf")
    parser.add_argument(
        "--scope", default=None, help=f"the target prompt: {' or '.join(TARGET_PROMPTS)} (default the first)"
    )
    parser.add_argument("--target", default=None, help='a target prompt of your own, e.g. "The capital city of x"')
    parser.add_argument("--placeholder", default=None, help="the placeholder of --target (default x)")
    parser.add_argument(
        "--occurrence", type=int, default=None, help="which placeholder, where it occurs several times (0, -1: last)"
    )
    parser.add_argument("--layers", default="all", help="blocks ℓ: all, a slice 0:10[:step] or a list 0,5,10")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens generated per block (greedy)")
    parser.add_argument("--position", type=int, default=-1, help="the source token (default -1, the last)")
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (default: the model config's)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the model config's)")
    return parser


def inspect_main(argv: Sequence[str]) -> str:
    """`patchscan inspect ...`: print (and return) the view."""
    import patchscan as ps

    args = inspect_parser().parse_args(list(argv))
    if args.scope is not None and args.target is not None:
        raise UserError("give --scope or --target, not both")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} is not valid; use a whole number >= 1")
    lm = ps.load_model(args.model, device=args.device, dtype=args.dtype)
    layers = grids.blocks(args.layers, lm.n_blocks, "--layers", lm.name)
    target = target_prompt(lm, args.scope, args.target, args.placeholder, args.occurrence)
    ids = lm.encode(args.text)
    token = lm.tokenizer.decode([ids[grids.position(args.position, len(ids), "--position", repr(args.text))]])
    header = [
        f"{lm.name} ({lm.n_blocks} blocks): {args.text!r}, token {args.position} ({token!r}), block ℓ",
        f"  -> {shorten(target.text)!r} at token {target.position} ({target.placeholder_token!r}), block ℓ* = ℓ; "
        f"{args.max_new_tokens} tokens",
    ]
    view = render(header, inspect_text(lm, args.text, target, layers, args.max_new_tokens, args.position))
    print(view)
    return view


# ---------------------------------------------------------------- a finished run's rows


def _default_method(methods: Sequence[str]) -> str:
    for preferred in ("patchscope", "token_identity"):
        if preferred in methods:
            return preferred
    return sorted(methods)[0]


def example_rows(run_dir: str | Path, example: str, method: str | None = None):
    """(rows of one example and one method, sorted by ℓ then ℓ*; the method) of a run dir or results dir."""
    from patchscan.runs.parts import read_results, run_meta

    run_meta(run_dir)  # one line when the folder is no run
    df = read_results(run_dir)
    rows = df[df["example_id"].astype(str) == str(example)]
    if rows.empty:
        ids = sorted(df["example_id"].astype(str).unique(), key=lambda i: (len(i), i))
        shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
        raise UserError(f"no example {example!r} in {run_dir}; its examples are {shown}")
    methods = sorted(set(rows["method"]))
    method = method or _default_method(methods)
    if method not in methods:
        raise UserError(f"no rows of method {method!r} for example {example!r}; choose from {', '.join(methods)}")
    rows = rows[(rows["method"] == method) & rows["source_layer"].notna()]
    return rows.sort_values(["source_layer", "target_layer"]), method


def _row_text(row) -> str:
    for column in ("generation", "pred_token"):
        if column in row and isinstance(row[column], str):
            return row[column]
    return f"token {row['pred_token_id']}" if "pred_token_id" in row else ""


def _rows_at(rows, spec: str, run_dir: str | Path, example: str):
    """The rows at the --layers blocks ℓ, resolved against the run's model; one line when none is there."""
    from patchscan.runs.parts import run_meta

    have = sorted({int(b) for b in rows["source_layer"]})
    n = (run_meta(run_dir)[1].get("model") or {}).get("n_blocks") or (have[-1] + 1 if have else 0)
    wanted = grids.blocks(spec, int(n), "--layers", "the run's model")
    kept = rows[rows["source_layer"].astype(int).isin(wanted)]
    if kept.empty:
        raise UserError(
            f"--layers={spec!r}: example {example} has no rows at block ℓ = {', '.join(map(str, wanted))}; "
            f"the run has blocks ℓ = {', '.join(map(str, have)) or 'none'}"
        )
    return kept


def show_view(run_dir: str | Path, example: str, method: str | None = None, layers: str | None = None) -> str:
    """The Table 3 view of one example of a finished run, from its Parquet rows alone."""
    rows, method = example_rows(run_dir, example, method)
    if layers is not None:
        rows = _rows_at(rows, layers, run_dir, example)
    first = rows.iloc[0] if len(rows) else None
    source = next((first[c] for c in ("source_text", "subject") if first is not None and c in first), None)
    prompt = first.get("target_prompt") if first is not None else None
    header = [
        f"{Path(run_dir)}: example {example}, method {method}" + (f", {first['model']}" if first is not None else ""),
        f"  {source!r}" + (f" -> {shorten(str(prompt))!r}" if isinstance(prompt, str) else ""),
    ]
    import pandas as pd

    cells = [
        (int(r["source_layer"]), -1 if pd.isna(r["target_layer"]) else int(r["target_layer"]), _row_text(r))
        for _, r in rows.iterrows()
    ]
    return render(header, cells)


def show_main(argv: Sequence[str]) -> str:
    """`patchscan show RUN_DIR --example ID`: print (and return) the view."""
    parser = _Parser(prog="patchscan show", description="The Table 3 view of one example of a finished run.")
    parser.add_argument("run_dir", type=Path, help="a run dir, or a results dir")
    parser.add_argument("--example", required=True, help="the example_id")
    parser.add_argument("--method", default=None, help="default: patchscope or token_identity where the run has it")
    parser.add_argument("--layers", default=None, help="source blocks ℓ to show: a slice 0:10 or a list 0,5")
    args = parser.parse_args(list(argv))
    if not args.run_dir.exists():
        raise UserError(f"no run dir {args.run_dir}")
    view = show_view(args.run_dir, args.example, args.method, args.layers)
    print(view)
    return view
