"""Recompute rows of a next_token run with plain Hugging Face calls, as the paper's code does.

    python scripts/crosscheck_next_token.py RUN_DIR [--examples N]

Why: the fast engine is tested against patchscan's own naive method, which shares its hook
helpers. This script shares nothing with the engine: for each example it runs the source text
with `output_hidden_states=True` and takes `hidden_states[ℓ + 1]` (the output of block ℓ),
reads the logit lens through the model's final norm and output embedding, and runs the whole
identity prompt with one forward hook on block ℓ that overwrites the last position, exactly
the paper's `evaluate_patch_next_token_prediction`. It prints, per method, how many stored
predictions it reproduces, and the precision@1 of both methods on the checked rows, so that
anyone with another implementation can compare with patchscan row by row (every row carries
its token ids). The last block is left out: HF's last hidden state is after the final norm.
Exit status 1 when any stored prediction differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from patchscan.errors import UserError
from patchscan.models import load_model
from patchscan.runs.parts import read_results, run_config


def overwrite_last_position(vector: torch.Tensor):
    """A forward hook for one block: its output at the last position becomes `vector`."""

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, -1] = vector
        return output

    return hook


@torch.no_grad()
def recompute(view, source_ids: list[int], position: int, target_ids: list[int] | None, layers: list[int]) -> dict:
    """Plain-HF reference, logit lens, and (given target ids) token identity (ℓ* = ℓ) predictions for one example."""
    model, device = view.model, view.input_device
    out = model(torch.tensor([source_ids], device=device), output_hidden_states=True)
    preds = {"ref": int(out.logits[0, position].argmax())}
    norm = view.final_norm if view.final_norm is not None else torch.nn.Identity()
    for layer in layers:
        h = out.hidden_states[layer + 1][0, position]
        preds[("logit_lens", layer)] = int(model.get_output_embeddings()(norm(h)).argmax())
        if target_ids is None:
            continue
        handle = view.blocks[layer].register_forward_hook(overwrite_last_position(h))
        try:
            target = torch.tensor([target_ids], device=device)
            preds[("token_identity", layer)] = int(model(target).logits[0, -1].argmax())
        finally:
            handle.remove()
    return preds


def crosscheck(args: argparse.Namespace) -> int:
    """Recompute the run's rows; 0 when every stored prediction is reproduced, 1 otherwise."""
    _, config = run_config(args.run_dir)
    if config["experiment"]["name"] != "next_token":
        raise UserError(f"{args.run_dir} is a {config['experiment']['name']} run, not next_token")
    df = read_results(args.run_dir)
    view = load_model(config["model"])
    last = view.n_blocks - 1
    df = df[df["method"].isin(["token_identity", "logit_lens"]) & (df["source_layer"] < last)]
    df = df[(df["method"] == "logit_lens") | (df["source_layer"] == df["target_layer"])]
    ids = list(dict.fromkeys(df["example_id"]))[: args.examples]
    agree: dict[str, list[bool]] = {"token_identity": [], "logit_lens": [], "reference": []}
    records = []
    for example_id in ids:
        rows = df[df["example_id"] == example_id]
        first = rows.iloc[0]
        layers = sorted(set(rows["source_layer"]))
        target = rows[rows["method"] == "token_identity"]
        target_ids = list(target.iloc[0]["target_token_ids"]) if len(target) else None
        preds = recompute(view, list(first["source_token_ids"]), int(first["source_position"]), target_ids, layers)
        agree["reference"].append(preds["ref"] == int(first["ref_token_id"]))
        for _, row in rows.iterrows():
            mine = preds[(row["method"], int(row["source_layer"]))]
            agree[row["method"]].append(mine == int(row["pred_token_id"]))
            records.append(
                {"method": row["method"], "block": int(row["source_layer"]), "precision_at_1": mine == preds["ref"]}
            )
    print(f"{args.run_dir}: {len(ids)} examples recomputed with plain HF calls")
    for method, flags in agree.items():
        if flags:
            print(f"  {method:15s} {sum(flags)}/{len(flags)} stored predictions reproduced")
    table = pd.DataFrame(records).pivot_table(index="block", columns="method", values="precision_at_1")
    print("precision@1 recomputed on these examples:")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    return 0 if all(all(flags) for flags in agree.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--examples", type=int, default=50, help="how many examples to recompute (default 50)")
    try:
        return crosscheck(parser.parse_args())
    except UserError as exc:
        print(f"crosscheck: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
