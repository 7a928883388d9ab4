"""Benchmark patchscan against the naive per-patch method, in one run, on one machine.

Workloads (DESIGN §4, issues 8 and 12):
  (a) next-token grid with ℓ* = ℓ (token identity over every block),
  (b) the full ℓ×ℓ* next-token grid,
  (c) the attribute-extraction generation grid (greedy continuations over (ℓ, ℓ*) cells),
  (d) multihop end to end: the scope's own chunk code on LRE two-hop candidates, the single-hop
      filter, vanilla and CoT answers and the patchscope / patchscope_code / backpatch grid,
  (e) attribute extraction end to end: the subject-in-prompt baseline, the source states and the
      (ℓ, ℓ*) grid, through the scope's own chunk code.
The naive method runs one HF forward (or generate call) per patch or prompt with its own hook,
as the paper's code does. It is timed on a random subset of cells (--naive-cells) and its rate is
compared with patchscan's rate on the whole grid; agreement is checked on that subset. In (d)
and (e) the naive method reruns a random sample of every generation the scope asked for
(filter, baselines and grid alike). patchscan's time includes capturing the source states;
model loading is reported apart.

    python scripts/bench.py [--model smollm2_135m] [--dtype float32] [--device auto]
"""

from __future__ import annotations

import time

START = time.perf_counter()  # start-up (imports, model load) is counted in the end-to-end ratio

import argparse
import os
import random
import sys
from pathlib import Path

import torch

from patchscan import engine
from patchscan.engine import Patch, capture, generate, patched_next_token
from patchscan.engine.counting import count_work
from patchscan.engine.naive import naive_generate, naive_logits
from patchscan.models import load_model
from patchscan.worklog import peak_memory_mb

TEXTS = [
    "The Eiffel Tower is located in the city of",
    "Water freezes at zero degrees",
    "The cat sat on the mat and looked at the",
    "She plays the piano every day after school",
    "The largest planet in the solar system is",
    "In the morning he drinks a cup of",
    "The train to the capital leaves from platform",
    "Our neighbours planted tomatoes and",
]
SUBJECTS = ["France", "Japan", "Canada", "Egypt", "Brazil", "Italy", "Peru", "Norway"]
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
ATTRIBUTE = "The capital city of x"


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    peak_memory_reset(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, peak_memory_mb(device)


def report(name, n_fast, t_fast, mem_fast, n_naive, t_naive, mem_naive, agree, what, startup):
    fast_rate, naive_rate = n_fast / t_fast, n_naive / t_naive
    with_startup = (n_fast / naive_rate) / (t_fast + startup)  # naive time for the whole grid / ours + start-up
    print(f"\n({name})")
    print(
        f"  patchscan: {n_fast:6d} patched runs in {t_fast:8.2f} s = {fast_rate:9.1f} runs/s, peak {mem_fast:8.0f} MiB"
    )
    print(
        f"  naive:     {n_naive:6d} patched runs in {t_naive:8.2f} s = {naive_rate:9.1f} runs/s, "
        f"peak {mem_naive:8.0f} MiB"
    )
    print(
        f"  ratio: {fast_rate / naive_rate:.1f}x  ({with_startup:.1f}x counting patchscan's {startup:.1f} s start-up "
        f"against the naive time for the whole grid)   results agree ({what}): {agree}"
    )
    return fast_rate / naive_rate


class Recorder:
    """The batched engine, keeping every generation it is asked for: (patch, max_new_tokens, tokens)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(engine, name)

    def generate(self, view, patches, max_new_tokens=20, **kwargs):
        out = engine.generate(view, patches, max_new_tokens=max_new_tokens, **kwargs)
        self.calls += [(p, max_new_tokens, o) for p, o in zip(patches, out)]
        return out


def scope_for(view, overrides: list[str]):
    """A scope composed from the project's configs, bound to the loaded model, recording its generations."""
    from hydra import compose, initialize_config_dir

    from patchscan.scopes import get_scope

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    scope = get_scope(cfg.experiment.name)(cfg)
    scope.engine = Recorder()
    scope.bind(view)
    return scope, scope.engine


def main(argv=None) -> int:  # noqa: C901, PLR0915 (one table of workloads; split pending, issue 19)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a config name under configs/model")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--examples", type=int, default=8, help="source prompts per workload")
    parser.add_argument("--naive-cells", type=int, default=120, help="cells the naive method runs per workload")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--gen-layer-step", type=int, default=3, help="(c) uses every k-th block for ℓ and ℓ*")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--workloads", default="abcde")
    parser.add_argument(
        "--lre",
        default=os.environ.get("PATCHSCAN_LRE", "../shared/data/lre"),
        help="LRE relation files for (d) and (e)",
    )
    parser.add_argument("--multihop-candidates", type=int, default=24, help="(d) two-hop candidates before the filter")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / f"{args.model}.yaml")
    cfg.device = args.device
    if args.dtype:
        cfg.dtype = args.dtype
    start = time.perf_counter()
    view = load_model(cfg)
    load_s = time.perf_counter() - start
    startup = time.perf_counter() - START
    device = view.device
    print(
        f"model {view.name}: {view.n_blocks} blocks, width {view.width}, {view.dtype}, {device}; "
        f"loaded in {load_s:.1f} s (start-up with imports {startup:.1f} s); torch threads {torch.get_num_threads()}"
    )
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    rng = random.Random(0)
    layers = list(range(view.n_blocks))
    sources = [view.encode(t) for t in TEXTS[: args.examples]]
    identity = tuple(view.encode(IDENTITY))
    ratios = {}

    def grid(pairs, target):
        def run():
            caps = capture(view, sources, layers, [[-1]] * len(sources), batch_size=args.batch_size)
            patches = [
                Patch(target_ids=target, target_position=-1, target_layer=t, vector=c.states[s, 0])
                for c in caps
                for s, t in pairs
            ]
            return patches, patched_next_token(view, patches, top_k=1, batch_size=args.batch_size)

        return run

    for key, pairs in (("a", [(b, b) for b in layers]), ("b", [(s, t) for s in layers for t in layers])):
        if key not in args.workloads:
            continue
        (patches, top), t_fast, m_fast = timed(grid(pairs, identity), device)
        cells = rng.sample(range(len(patches)), min(args.naive_cells, len(patches)))
        naive, t_naive, m_naive = timed(lambda: [naive_logits(view, patches[i]).argmax().item() for i in cells], device)
        agree = all(top.ids[i, 0].item() == p for i, p in zip(cells, naive))
        label = (
            "next-token grid, target block = source block"
            if key == "a"
            else "full source x target block next-token grid"
        )
        ratios[key] = report(
            f"{key}) {label}",
            len(patches),
            t_fast,
            m_fast,
            len(cells),
            t_naive,
            m_naive,
            agree,
            f"same argmax on {len(cells)} cells",
            startup,
        )

    if "c" in args.workloads:
        from patchscan.prompts import placeholder_position

        ids, pos = placeholder_position(view, ATTRIBUTE, "x")
        subjects = [view.encode(s) for s in SUBJECTS[: args.examples]]
        gen_layers = layers[:: args.gen_layer_step]

        def run_gen():
            caps = capture(view, subjects, gen_layers, [[-1]] * len(subjects), batch_size=args.batch_size)
            patches = [
                Patch(target_ids=tuple(ids), target_position=pos, target_layer=t, vector=c.states[k, 0])
                for c in caps
                for k, _ in enumerate(gen_layers)
                for t in gen_layers
            ]
            return patches, generate(view, patches, max_new_tokens=args.new_tokens, batch_size=args.batch_size)

        (patches, gens), t_fast, m_fast = timed(run_gen, device)
        cells = rng.sample(range(len(patches)), min(max(args.naive_cells // 4, 1), len(patches)))
        naive, t_naive, m_naive = timed(
            lambda: [naive_generate(view, patches[i], args.new_tokens) for i in cells], device
        )
        agree = all(gens[i] == g for i, g in zip(cells, naive))
        ratios["c"] = report(
            f"c) attribute-extraction generation grid, {args.new_tokens} tokens, every {args.gen_layer_step}rd block",
            len(patches),
            t_fast,
            m_fast,
            len(cells),
            t_naive,
            m_naive,
            agree,
            f"same generations on {len(cells)} cells",
            startup,
        )
    for key, experiment, overrides in (
        ("d", "multihop", [f"dataset.limit={args.multihop_candidates}"]),
        ("e", "attribute_extraction", [f"dataset.limit={args.examples}"]),
    ):
        if key not in args.workloads:
            continue
        step = f"::{args.gen_layer_step}"
        scope, recorder = scope_for(
            view,
            [
                f"+experiment={experiment}",
                f"dataset.path={args.lre}",
                f"sweep.source_layers={step}",
                f"sweep.target_layers={step}",
                f"generation.max_new_tokens={args.new_tokens}",
                f"runner.batch_size={args.batch_size}",
                *overrides,
            ],
        )
        examples = scope.examples()
        with count_work(view.model) as counts:
            df, t_fast, m_fast = timed(lambda: scope.run_chunk(examples, lambda n: None), device)
        calls = recorder.calls
        cells = rng.sample(range(len(calls)), min(max(args.naive_cells // 4, 1), len(calls)))
        naive, t_naive, m_naive = timed(lambda: [naive_generate(view, calls[i][0], calls[i][1]) for i in cells], device)
        agree = all(calls[i][2] == g for i, g in zip(cells, naive))
        methods = df["method"].value_counts().to_dict()
        print(
            f"\n({key}) {experiment} end to end: {len(examples)} examples, rows {methods}; "
            f"{counts.forward_passes} forward passes, {counts.tokens_generated} tokens generated"
        )
        ratios[key] = report(
            f"{key}) {experiment} end to end, every {args.gen_layer_step}rd block, {args.new_tokens} tokens",
            len(calls),
            t_fast,
            m_fast,
            len(cells),
            t_naive,
            m_naive,
            agree,
            f"same generations on {len(cells)} sampled runs",
            startup,
        )
    print("\nsummary: " + ", ".join(f"({k}) {v:.1f}x" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
