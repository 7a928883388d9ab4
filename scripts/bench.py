"""Benchmark patchscan against the naive per-patch method, in one run, on one machine.

Workloads (DESIGN §4, issues 8, 12 and 19):
  (a) next-token grid with ℓ* = ℓ (token identity over every block),
  (b) the full ℓ×ℓ* next-token grid,
  (c) the attribute-extraction generation grid (greedy continuations over (ℓ, ℓ*) cells, no stops),
  (d) multihop end to end: the scope's own chunk code on LRE two-hop candidates, the single-hop
      filter, vanilla and CoT answers and the patchscope / patchscope_code / backpatch grid,
  (e) attribute extraction end to end: the subject-in-prompt baseline, the source states and the
      (ℓ, ℓ*) grid, through the scope's own chunk code,
  (f) entity descriptions end to end: the paper's few-shot prompt, 50 tokens, ℓ* = ℓ on every
      other block, through the scope's own chunk code (Rouge-L scored; the embedding model is off).
The naive method runs one HF forward (or generate call, full length, no stopping) per patch or
prompt with its own hook, as the paper's code does. It is timed on a random subset of cells
(--naive-cells) and its rate is compared with patchscan's rate on the whole workload; agreement is
checked on that subset: equal argmaxes, equal generations (the naive one cut where the row's stop
holds) and equal per-row metrics (correctness, first description). Generation workloads also
report the tokens generated per run, achieved GFLOP/s beside a matmul of the model's shapes timed
in the same run, and how much block work sharing the blocks below ℓ* between rows with the same
continuation saves (generation.share_lower_blocks; --share both runs each workload with and without
it and compares time, generations and the block rows run). With --dtype other than float32, every
workload also runs on a float32 copy of the model, and the speed ratio and agreement with it are reported.
With --sites resid_post,mlp_out every workload runs once per site (states read and written at that site
of each block, issue 28), each against the naive method at the same site, and the summary gives each
site's speed beside the first one's.

    python scripts/bench.py [--model smollm2_135m] [--dtype float32] [--device auto] [--quick] [--share both]
                            [--sites resid_post,mlp_out]

The script runs against an older engine too (PYTHONPATH=/path/to/old/src): what that engine lacks
(stops) is left out, and configs are read from the checkout the imported patchscan belongs to.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # start-up (imports, model load) is counted in the end-to-end ratio

import argparse
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import patchscan
from patchscan import engine
from patchscan.engine import Patch, capture, generate, patched_next_token
from patchscan.engine.counting import Counts, count_work
from patchscan.metrics.text import contains_answer
from patchscan.models import load_model
from patchscan.runs.worklog import peak_memory_mb

# the naive reference lives with the tests (tests/reference.py: it shares no code with the engine)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import naive_generate, naive_logits  # noqa: E402

try:  # absent from engines older than issue 19 part 2: no shared decoding there
    from patchscan.engine import sharing
except ImportError:  # pragma: no cover (older engines)
    sharing = None
try:  # absent from engines older than issue 19: no stops there
    from patchscan.metrics.answers import StopAfterDescription, StopWhenFound, first_description
except ImportError:  # pragma: no cover (older engines)
    StopAfterDescription = StopWhenFound = None
    from patchscan.experiments.entities import first_description

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
CAPITALS = ["Paris", "Tokyo", "Ottawa", "Cairo", "Brasília", "Rome", "Lima", "Oslo"]
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
ATTRIBUTE = "The capital city of x"
CONFIGS = Path(patchscan.__file__).resolve().parents[2] / "configs"
# The tree under test may predate the `experiment` slot in the root config (then it is appended with +).
EXPERIMENT_KEY = "experiment" if "experiment: null" in (CONFIGS / "config.yaml").read_text() else "+experiment"


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


@dataclass
class Measured:
    """One workload on one model: its runs, time, work, per-run outputs and per-row metrics."""

    label: str
    runs: int
    seconds: float
    peak_mb: float
    counts: Counts | None = None
    outputs: list = field(default_factory=list)  # argmax ids or token lists, one per run
    metrics: list = field(default_factory=list)  # per-row metrics (correct, description), if any
    calls: list = field(default_factory=list)  # (patch, max_new_tokens, tokens, stop) per generated run
    generation: bool = False
    block_rows: dict = field(default_factory=dict)  # decode block rows run with sharing, and a plain run's


class Recorder:
    """The batched engine, keeping every generation it is asked for: (patch, max_new_tokens, tokens, stop)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(engine, name)

    def generate(self, view, patches, max_new_tokens=20, **kwargs):
        out = engine.generate(view, patches, max_new_tokens=max_new_tokens, **kwargs)
        stops = kwargs.get("stops") or [None] * len(patches)
        self.calls += [(p, max_new_tokens, o, s) for p, o, s in zip(patches, out, stops)]
        return out


def capture_rows(args) -> int:
    """Source prompts per capture forward: as the scopes choose it (Experiment.capture_batch_size)."""
    return 64 if args.batch_size == "auto" else args.batch_size


def site_of(args) -> dict:
    """capture's keyword for the site under test (none at the block output: older engines lack it)."""
    return {} if args.site == "resid_post" else {"site": args.site}


def target_of(args) -> dict:
    return {} if args.site == "resid_post" else {"target_site": args.site}


def at_site(args) -> str:
    return "" if args.site == "resid_post" else f", at {args.site}"


def scope_for(view, overrides: list[str]):
    """A scope composed from the project's configs, bound to the loaded model, recording its generations."""
    from hydra import compose, initialize_config_dir

    from patchscan.experiments import get_experiment

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    scope = get_experiment(cfg.experiment.name)(cfg)
    scope.engine = Recorder()
    scope.bind(view)
    return scope, scope.engine


# --- workloads ---------------------------------------------------------------------------------


def next_token_grid(view, args, key: str) -> Measured:
    layers = list(range(view.n_blocks))
    pairs = [(b, b) for b in layers] if key == "a" else [(s, t) for s in layers for t in layers]
    sources = [view.encode(t) for t in TEXTS[: args.examples]]
    identity = tuple(view.encode(IDENTITY))

    def run():
        caps = capture(view, sources, layers, [[-1]] * len(sources), batch_size=capture_rows(args), **site_of(args))
        patches = [
            Patch(target_ids=identity, target_position=-1, target_layer=t, vector=c.states[s, 0], **target_of(args))
            for c in caps
            for s, t in pairs
        ]
        return patches, patched_next_token(view, patches, top_k=1, batch_size=args.batch_size)

    (patches, top), seconds, mem = timed(run, view.device)
    label = "next-token grid, target block = source block" if key == "a" else "full source x target next-token grid"
    label += at_site(args)
    calls = [(p, 0, None, None) for p in patches]
    return Measured(label, len(patches), seconds, mem, outputs=top.ids[:, 0].tolist(), calls=calls)


def attribute_generation_grid(view, args) -> Measured:
    """(c): each row stops once its subject's capital appears, as attribute_extraction runs it
    (generation.stop_when_correct); --no-stop, or an engine without stops, generates full length."""
    from patchscan.experiments.prompts import placeholder_position

    ids, pos = placeholder_position(view, ATTRIBUTE, "x")
    subjects = [view.encode(s) for s in SUBJECTS[: args.examples]]
    gen_layers = list(range(view.n_blocks))[:: args.gen_layer_step]
    stop = StopWhenFound is not None and not args.no_stop
    answers = [CAPITALS[k] for k in range(len(subjects)) for _ in gen_layers for _ in gen_layers]
    stops = {"stops": [StopWhenFound(a) for a in answers]} if stop else {}
    if args.sharing is not None:
        stops["share_lower_blocks"] = args.sharing

    def run():
        caps = capture(
            view, subjects, gen_layers, [[-1]] * len(subjects), batch_size=capture_rows(args), **site_of(args)
        )
        patches = [
            Patch(target_ids=tuple(ids), target_position=pos, target_layer=t, vector=c.states[k, 0], **target_of(args))
            for c in caps
            for k, _ in enumerate(gen_layers)
            for t in gen_layers
        ]
        return patches, generate(view, patches, max_new_tokens=args.new_tokens, batch_size=args.batch_size, **stops)

    with count_work(view.model) as counts:
        (patches, gens), seconds, mem = timed(run, view.device)
    label = f"attribute-extraction generation grid, {args.new_tokens} tokens, every {args.gen_layer_step}rd block"
    label += (", stop when correct" if stop else ", full length") + at_site(args)
    calls = [(p, args.new_tokens, g, s) for p, g, s in zip(patches, gens, stops.get("stops") or [None] * len(gens))]
    metrics = [contains_answer(view.decode(g), a) for g, a in zip(gens, answers)]
    return Measured(label, len(patches), seconds, mem, counts, gens, metrics, calls, True)


SCOPE_WORKLOADS = {
    "d": ("multihop", "multihop end to end"),
    "e": ("attribute_extraction", "attribute extraction end to end"),
    "f": ("entity_resolution", "entity descriptions end to end (paper prompt)"),
}


def scope_overrides(key: str, args) -> list[str]:
    experiment = SCOPE_WORKLOADS[key][0]
    common = [f"{EXPERIMENT_KEY}={experiment}", f"runner.batch_size={args.batch_size}"]
    if args.site != "resid_post":
        common += [f"patchscope.source_site={args.site}", f"patchscope.target_site={args.site}"]
    if args.sharing is not None:
        common.append(f"++generation.share_lower_blocks={str(args.sharing).lower()}")
    # the controls these workloads were first measured with (docs/performance.md), not today's defaults
    common.append("controls=[prompt_only,embedding_only,shuffled_source]" if key == "e" else "controls=[]")
    if key == "f":
        return common + [f"dataset.limit={args.entities}", "similarity.embedding=false"]
    step = f"::{args.gen_layer_step}"
    limit = args.multihop_candidates if key == "d" else args.examples
    return common + [
        f"dataset.path={args.lre}",
        f"sweep.source_layers={step}",
        f"sweep.target_layers={step}",
        f"generation.max_new_tokens={args.new_tokens}",
        f"dataset.limit={limit}",
    ]


def scope_workload(view, args, key: str) -> Measured:
    scope, recorder = scope_for(view, scope_overrides(key, args))
    examples = scope.examples()
    with count_work(view.model) as counts:
        df, seconds, mem = timed(lambda: scope.run_chunk(examples, lambda n: None), view.device)
    column = "description" if key == "f" else "correct"
    methods = df["method"].value_counts().to_dict()
    label = f"{SCOPE_WORKLOADS[key][1]}: {len(examples)} examples, rows {methods}{at_site(args)}"
    outputs = [c[2] for c in recorder.calls]
    return Measured(
        label, len(recorder.calls), seconds, mem, counts, outputs, df[column].tolist(), recorder.calls, True
    )


# --- checks and reports -------------------------------------------------------------------------


def row_metric(view, stop, tokens):
    """What the scorer reads from a continuation: correctness, the first description, else the text."""
    text = view.decode(tokens)
    if StopWhenFound is not None and isinstance(stop, StopWhenFound):
        return contains_answer(text, stop.answer, stop.case_sensitive)
    if StopAfterDescription is not None and isinstance(stop, StopAfterDescription):
        return first_description(text)
    return text


def cut_at_stop(view, tokens, stop):
    if stop is None:
        return list(tokens)
    from patchscan.engine.decoding import truncate_at_stop

    return truncate_at_stop(view, tokens, stop)


def naive_check(view, m: Measured, args, rng) -> tuple:
    """Naive runs on sampled cells: (n, seconds, peak MiB, agreement text)."""
    share = args.naive_cells if not m.generation else max(args.naive_cells // 4, 1)
    cells = rng.sample(range(len(m.calls)), min(share, len(m.calls)))
    if not m.generation:
        naive, seconds, mem = timed(
            lambda: [naive_logits(view, m.calls[i][0]).argmax().item() for i in cells], view.device
        )
        agree = all(m.outputs[i] == p for i, p in zip(cells, naive))
        return len(cells), seconds, mem, f"same argmax on {len(cells)} cells: {agree}"
    naive, seconds, mem = timed(
        lambda: [naive_generate(view, m.calls[i][0], m.calls[i][1]) for i in cells], view.device
    )
    same_gen = all(cut_at_stop(view, g, m.calls[i][3]) == m.calls[i][2] for i, g in zip(cells, naive))
    same_metric = all(
        row_metric(view, m.calls[i][3], g) == row_metric(view, m.calls[i][3], m.calls[i][2])
        for i, g in zip(cells, naive)
    )
    return (
        len(cells),
        seconds,
        mem,
        f"on {len(cells)} sampled runs: same generations (naive cut at the stop) {same_gen}, "
        f"same per-row metrics as full-length naive {same_metric}",
    )


def matmul_roof(view, rows: int = 256, repeat: int = 20) -> float:
    """GFLOP/s of a (rows x width) @ (width x intermediate) matmul in the model's dtype on its device."""
    config = view.model.config.get_text_config()
    inner = getattr(config, "intermediate_size", None) or 4 * view.width
    a = torch.randn(rows, view.width, dtype=view.dtype, device=view.device)
    b = torch.randn(view.width, inner, dtype=view.dtype, device=view.device)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        sync(view.device)
        start = time.perf_counter()
        a @ b
        sync(view.device)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * view.width * inner / best / 1e9


def dense_flops_per_token(view) -> float:
    """2 x (block parameters + LM head) per token run: dense matmuls, attention over the cache left out."""
    blocks = sum(p.numel() for p in view.blocks.parameters())
    return 2.0 * (blocks + view.vocab_size * view.width)


def block_flops_per_row(view) -> float:
    """2 x the parameters of one block: one row through one block."""
    return 2.0 * sum(p.numel() for p in view.blocks.parameters()) / view.n_blocks


def lower_block_sharing(view, calls) -> tuple[float, float]:
    """Share of decode block work saved if rows of one target that have generated the same tokens
    so far ran blocks 0..ℓ* once: (within one ℓ*, across ℓ* with a fan-out at each row's ℓ*)."""
    groups: dict = {}
    for patch, _, tokens, _ in calls:
        if patch.vector is not None and tokens:
            groups.setdefault(tuple(patch.target_ids), []).append((patch.target_layer, tokens))
    n, now, per_layer, across = view.n_blocks, 0, 0, 0
    for rows in groups.values():
        for j in range(max(len(t) for _, t in rows) - 1):  # token j is run through the model if more follow
            alive = [(lay, tuple(t[: j + 1])) for lay, t in rows if len(t) > j + 1]
            now += n * len(alive)
            per_layer += sum(lay + 1 for lay, _ in set(alive)) + sum(n - lay - 1 for lay, _ in alive)
            across += sum(
                len({c for lay, c in alive if lay >= b}) + sum(1 for lay, _ in alive if lay < b) for b in range(n)
            )
    if not now:
        return 0.0, 0.0
    return 1 - per_layer / now, 1 - across / now


def report(view, m: Measured, naive: tuple, startup: float, roof: float) -> float:
    n_naive, t_naive, mem_naive, agree = naive
    fast_rate, naive_rate = m.runs / m.seconds, n_naive / t_naive
    with_startup = (m.runs / naive_rate) / (m.seconds + startup)
    print(f"\n({m.label})")
    print(f"  patchscan: {m.runs:6d} runs in {m.seconds:8.2f} s = {fast_rate:9.1f} runs/s, peak {m.peak_mb:8.0f} MiB")
    print(f"  naive:     {n_naive:6d} runs in {t_naive:8.2f} s = {naive_rate:9.1f} runs/s, peak {mem_naive:8.0f} MiB")
    print(
        f"  ratio: {fast_rate / naive_rate:.1f}x  ({with_startup:.1f}x counting patchscan's {startup:.1f} s start-up "
        f"against the naive time for the whole workload)   agreement {agree}"
    )
    if m.generation and m.counts is not None:
        full = sum(c[1] for c in m.calls)
        saved = m.block_rows.get("plain", 0) - m.block_rows.get("run", 0)  # block rows that sharing left out
        flops = m.counts.forward_tokens * dense_flops_per_token(view) - saved * block_flops_per_row(view)
        gflops = flops / m.seconds / 1e9
        per_layer, across = lower_block_sharing(view, m.calls)
        print(
            f"  tokens generated per run: {m.counts.tokens_generated / max(m.runs, 1):.1f} "
            f"(naive: {full / max(m.runs, 1):.1f}); {m.counts.forward_passes} forward passes; "
            f"{gflops:.1f} GFLOP/s achieved vs matmul roof {roof:.1f} GFLOP/s ({100 * gflops / roof:.0f}%; "
            "the LM head counted as a full fp32 matmul per token)"
        )
        print(
            f"  sharing blocks 0..ℓ* between rows with the same continuation: {100 * per_layer:.0f}% "
            f"of decode block work within one ℓ*, {100 * across:.0f}% with a fan-out at each ℓ* "
            f"(generation.share_lower_blocks; this run: {_shared_rows(m)})"
        )
    return fast_rate / naive_rate


def compare_sharing(view, args, key: str, shared: Measured) -> None:
    """Run the workload again without sharing blocks 0..ℓ*: speed ratio, equal generations, block work."""
    run = shared.block_rows or {"run": 0, "plain": 0}
    args.sharing = False
    try:
        plain = run_workload(view, args, key)
    finally:
        args.sharing = True
    same = sum(a == b for a, b in zip(shared.outputs, plain.outputs))
    metrics = sum(a == b for a, b in zip(shared.metrics, plain.metrics))
    saved = 1 - run["run"] / run["plain"] if run["plain"] else 0.0
    print(
        f"  sharing blocks 0..ℓ*: {shared.seconds:.2f} s vs {plain.seconds:.2f} s without = "
        f"{plain.seconds / shared.seconds:.2f}x as fast; decode block rows run {run['run']} of {run['plain']} "
        f"({100 * saved:.0f}% saved); equal generations {same}/{len(plain.outputs)}, "
        f"equal per-row metrics {metrics}/{len(plain.metrics)}"
    )


def _shared_rows(m: Measured) -> str:
    run, plain = m.block_rows.get("run", 0), m.block_rows.get("plain", 0)
    return f"{100 * (1 - run / plain):.0f}% of block rows left out" if plain else "not shared"


def agreement(m: Measured, ref: Measured) -> str:
    """Share of runs with equal outputs and of rows with equal metrics, against the float32 run."""
    same = sum(a == b for a, b in zip(m.outputs, ref.outputs)) / max(len(m.outputs), 1)
    what = "argmaxes" if not m.generation else "generations"
    text = f"equal {what} {100 * same:.1f}%"
    if m.metrics:
        rows = sum(a == b for a, b in zip(m.metrics, ref.metrics)) / max(len(m.metrics), 1)
        text += f", equal per-row metrics {100 * rows:.1f}%"
    return text


# --- main --------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a config name under configs/model")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--examples", type=int, default=8, help="source prompts per workload")
    parser.add_argument("--entities", type=int, default=16, help="(f) entities (the run's dataset.limit)")
    parser.add_argument("--naive-cells", type=int, default=120, help="cells the naive method runs per workload")
    parser.add_argument(
        "--batch-size",
        type=lambda s: s if s == "auto" else int(s),
        default="auto",
        help="rows per forward; auto (the experiments' default, runner.batch_size): from the memory budget",
    )
    parser.add_argument("--gen-layer-step", type=int, default=3, help="(c-e) use every k-th block for ℓ and ℓ*")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--workloads", default="abcdef")
    parser.add_argument("--no-stop", action="store_true", help="(c) generates full length (issue 12's workload)")
    parser.add_argument("--quick", action="store_true", help="small sizes: about 1-2 minutes on a 2-core CPU")
    parser.add_argument(
        "--share",
        choices=["default", "on", "off", "both"],
        default="default",
        help="(c, e, f) share blocks 0..ℓ* while decoding; both: run each with it, then without, and compare",
    )
    parser.add_argument(
        "--lre",
        default=os.environ.get("PATCHSCAN_LRE", "../shared/data/lre"),
        help="LRE relation files for (d) and (e)",
    )
    parser.add_argument("--multihop-candidates", type=int, default=24, help="(d) two-hop candidates before the filter")
    parser.add_argument(
        "--sites",
        default="resid_post",
        help="comma-separated sites (resid_post, resid_mid, attn_out, mlp_in, mlp_out): each workload at each",
    )
    args = parser.parse_args(argv)
    args.sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    args.site = args.sites[0]
    if args.quick:
        args.examples, args.entities, args.naive_cells, args.multihop_candidates = 2, 4, 12, 8
    args.sharing = {"default": None, "on": True, "off": False, "both": True}[args.share]
    return args


def load(args, dtype: str | None):
    try:  # a model config with the keys it inherits (_hub, _tiny); older trees have no bases
        try:
            from patchscan.paths import model_config
        except ImportError:  # trees before patchscan.paths
            from patchscan.models.loading import model_config

        cfg = model_config(args.model)
    except ImportError:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml"))
    cfg["device"] = args.device
    if dtype:
        cfg["dtype"] = dtype
    return load_model(cfg)


def run_workload(view, args, key: str) -> Measured:
    before = dict(sharing.BLOCK_ROWS) if sharing else {}
    if key in "ab":
        m = next_token_grid(view, args, key)
    elif key == "c":
        m = attribute_generation_grid(view, args)
    else:
        m = scope_workload(view, args, key)
    m.block_rows = {k: sharing.BLOCK_ROWS[k] - v for k, v in before.items()}
    return m


def describe(view, load_s: float, startup: float) -> None:
    print(
        f"model {view.name}: {view.n_blocks} blocks, width {view.width}, {view.dtype}, {view.device}; "
        f"loaded in {load_s:.1f} s (start-up with imports {startup:.1f} s); torch threads {torch.get_num_threads()}"
    )
    if view.device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        try:
            from patchscan.models.dtypes import native_bf16_line

            print(native_bf16_line())
        except ImportError:  # pragma: no cover (older engines)
            pass
    print(f"greedy tokens read by: {greedy_head_line(view)}")


def greedy_head_line(view) -> str:
    """How this engine reads each generated token (engines before the greedy head: full logits)."""
    try:
        from patchscan.engine.head import GreedyHead
    except ImportError:  # pragma: no cover (older engines)
        return "the model's full logits"
    head = GreedyHead.for_view(view)
    if head is None:
        return "the model's full logits (this family has no greedy head)"
    if head.screen:
        return "a bf16 screen of the unembedding with an fp32 recheck of the few tokens it cannot rule out (exact)"
    return "the unembedding in vocabulary chunks, reduced to the argmax as they go"


def main(argv=None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    view = load(args, args.dtype)
    load_s, startup = time.perf_counter() - start, time.perf_counter() - START
    describe(view, load_s, startup)
    reference = load(args, "float32") if view.dtype != torch.float32 else None
    roof = matmul_roof(view)
    print(f"matmul roof ({view.dtype}, 256 x width x intermediate): {roof:.1f} GFLOP/s")
    rng, ratios, rates = random.Random(0), {}, {}
    for site in args.sites:
        args.site = site  # what the workloads read
        for key in args.workloads:
            m = run_workload(view, args, key)
            ratios[key, args.site] = report(view, m, naive_check(view, m, args, rng), startup, roof)
            rates[key, args.site] = m.runs / m.seconds
            if args.share == "both" and m.generation:
                compare_sharing(view, args, key, m)
            if reference is not None:
                ref = run_workload(reference, args, key)
                print(
                    f"  vs float32 in this run: {ref.runs / ref.seconds:.1f} runs/s, {view.dtype} is "
                    f"{ref.seconds / m.seconds:.2f}x as fast; {agreement(m, ref)}"
                )
    first = args.sites[0]
    for site in args.sites:
        parts = [f"({k}) {ratios[k, site]:.1f}x" for k in args.workloads]
        if site != first:  # the same workload at another site, in this run: its speed beside the first site's
            parts = [
                f"{p}, {rates[k, site] / rates[k, first]:.2f}x {first}'s runs/s" for p, k in zip(parts, args.workloads)
            ]
        label = f" at {site}" if len(args.sites) > 1 else ""
        print(f"\nsummary{label} (vs naive): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
