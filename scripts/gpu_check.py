"""The GPU check (issue 29): correctness, speed and memory of the engine at the paper's model shapes,
in one process that prints each result as soon as it has it and stops itself inside --budget-s.

Models are random-weight Llama models built from transformers configs alone on the device (no weights
to carry): --shape 7b (Llama-2-7B: 32 blocks x 4096), 13b (40 x 5120, if the budget allows), tiny (CPU).
Tokens come from the built-in tokenizer's files (--tokenizer DIR; `--save-tokenizer DIR` writes them).

  (a) correctness: the engine (ps.next_token, ps.generate, engine.generate with stops) against the naive
      per-patch method (a plain forward hook in this script, one patch per forward) on sampled cells
      of a next-token grid and of patched generation: fp32 with TF32 off (must be equal), then bf16
      (share of equal argmaxes and generations, the top-2 logit gap of every disagreement);
  (b) speed, bf16: l* = l and full-grid next token, an attribute-style generation grid, entity
      descriptions (50 tokens with stops): runs/s, generated tokens/s, achieved TFLOP/s beside a bf16
      matmul of the model's shapes timed in the same run, and the same rows through a hand-batched
      Hugging Face loop with forward hooks (the ratio);
  (c) memory: peak GPU memory of each row against the dry run's estimate (on CPU: the process RSS).

    python scripts/gpu_check.py [--device auto] [--shape 7b,13b] [--budget-s 420] [--out DIR]

It imports neither Hydra, omegaconf nor gguf (a bare PyTorch + transformers machine runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import patchscan as ps
from patchscan import engine
from patchscan.metrics.answers import StopAfterDescription
from patchscan.runs.worklog import peak_memory_mb

warnings.filterwarnings("ignore", message=".*past_key_values.*")  # transformers' rename notice, once per call
START = time.monotonic()  # the budget counts from here (after the imports: a few seconds)

SHAPES = {  # Llama configs: blocks, width, MLP width, heads (key/value heads as many: Llama-2 7B and 13B)
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
    "13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40),
}
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
ENTITIES = ["Diana, Princess of Wales", "Alexander Fleming", "Mount Kilimanjaro", "The Beatles", "Marie Curie"]
ENTITIES += ["Amazon River", "Leonardo da Vinci", "Tokyo Stock Exchange"]
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
ATTRIBUTE = "The capital city of x"
DESCRIPTION = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)


@dataclass
class Sizes:
    """Workload sizes for one kind of device (a tiny CPU model is sized to finish in well under a minute)."""

    exact_cells: int  # fp32 next-token cells checked against the naive method
    exact_gens: int  # fp32 generations checked
    bf16_cells: int
    bf16_gens: int
    check_tokens: int  # tokens per checked generation
    sources: int  # source prompts of the next-token rows
    grid_sources: int  # source prompts of the full grid
    subjects: int  # attribute grid: subjects, every `gen_step`-th block for l and l*
    gen_step: int
    entities: int  # entity descriptions: every other block
    hf_batch: int  # rows per forward of the hand-batched HF loop
    roof_rows: int  # rows of the roof matmul


SIZES = {
    "cpu": Sizes(8, 3, 8, 3, 8, 2, 1, 2, 2, 2, 16, 256),
    "cuda": Sizes(24, 6, 48, 12, 20, 4, 2, 4, 4, 8, 64, 4096),
}


# --- the clock, the results ------------------------------------------------------------------------


class Report:
    """Results as they come: printed at once, written to --out after each, stopped at the budget."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.rows, self.meta, self.longest = out, budget_s, [], {}, 0.0
        out.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - START)

    def room_for(self, what: str) -> bool:
        """Start a step only with twice the longest step so far left (and a watchdog behind that)."""
        if self.left() > max(2 * self.longest, 3.0):
            return True
        self.add({"section": "skipped", "row": what, "why": f"budget: {self.left():.0f} s left"})
        return False

    @contextmanager
    def step(self):
        start = time.monotonic()
        yield
        self.longest = max(self.longest, time.monotonic() - start)

    def add(self, row: dict) -> None:
        with self.lock:
            self.rows.append(row)
            print(f"[{time.monotonic() - START:6.1f} s] " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
            sys.stdout.flush()
            self.write()

    def write(self) -> None:
        data = {"meta": self.meta, "elapsed_s": round(time.monotonic() - START, 1), "rows": self.rows}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(data))

    def watchdog(self) -> threading.Timer:
        def stop():
            self.meta["stopped_at_budget"] = True
            self.add({"section": "stopped", "why": f"--budget-s {self.budget_s:.0f} reached; results so far kept"})
            os._exit(3)

        timer = threading.Timer(max(self.left() - 1.0, 0.1), stop)
        timer.daemon = True
        timer.start()
        return timer


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(data: dict) -> str:
    lines = ["# GPU check", "", "  ".join(f"{k}: {_fmt(v)}" for k, v in data["meta"].items()), ""]
    by_section: dict[str, list[dict]] = {}
    for row in data["rows"]:
        by_section.setdefault(row["section"], []).append(row)
    for section, rows in by_section.items():
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "section"))
        lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- models, tokens, the dry run's estimate ---------------------------------------------------------


def load_tokenizer(folder: str | None):
    """The built-in tokenizer from its files (a folder with tokenizer.json), else the built-in model's."""
    from transformers import PreTrainedTokenizerFast

    if folder:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        from patchscan.models.loading import builtin_tokenizer

        tokenizer = builtin_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build(shape: str, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama of `shape` built on the device from its config alone, viewed by patchscan."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **SHAPES[shape],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=0.2 if shape == "tiny" else 0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return ps.ModelView.wrap(model, tokenizer, name=f"random llama {shape}")


def dry_run_bytes_per_row():
    """ADAPTER, the one line to fix when the estimate moves: the dry run's memory estimate of one row
    (its KV cache, logits, activations) at a sequence length; the dry run plans weights + the largest
    micro-batch x this (dry_run.CountingBackend.forward, Plan.peak_bytes)."""
    try:
        from patchscan.engine.batching import bytes_per_row  # after the dry-run reorganisation
    except ImportError:
        from patchscan.engine.patching import bytes_per_row
    return bytes_per_row


def weight_bytes(view) -> int:
    return sum(p.numel() * p.element_size() for p in view.model.parameters())


@contextmanager
def forwards(view):
    """(rows, sequence length) of every forward of the base model while the block runs, and the dense
    FLOPs of the blocks that ran (counted at each block's MLP, so skipped blocks count nothing)."""
    seen, flops = [], [0.0]
    per_block = 2.0 * sum(p.numel() for p in view.blocks.parameters()) / view.n_blocks

    def base_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        kv = kwargs.get("past_key_values")
        past = kv.get_seq_length() if kv is not None and hasattr(kv, "get_seq_length") else 0
        seen.append((int(ids.shape[0]), int(past) + int(ids.shape[1])))

    def mlp_hook(module, args):
        flops[0] += per_block * args[0].numel() / args[0].shape[-1]

    handles = [view.model.base_model.register_forward_pre_hook(base_hook, with_kwargs=True)]
    handles += [block.mlp.register_forward_pre_hook(mlp_hook) for block in view.blocks]
    try:
        yield seen, flops
    finally:
        for h in handles:
            h.remove()


def memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def memory_peak(device: torch.device) -> float:
    """Peak GPU allocations (torch.cuda.max_memory_allocated), else this process's peak RSS, in bytes."""
    return peak_memory_mb(device) * 2**20


# --- the naive method and the hand-batched HF loop ---------------------------------------------------


def overwrite_hook(rows, positions, vectors, prefill_only: bool):
    """A forward hook on one block: rows[i]'s hidden state at positions[i] becomes vectors[i]."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if prefill_only and calls[0] > 1:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[rows, positions] = vectors.to(hidden.dtype)
        return output

    return hook


def _target(patch) -> tuple[list[int], int]:
    ids = list(patch.target_ids)
    return ids, patch.target_position % len(ids)


@contextmanager
def batch_hooks(view, patches, prefill_only: bool):
    """The expert's batched patching: one hook per block l* in the batch, each writing its rows."""
    by_layer: dict[int, list[int]] = {}
    for row, p in enumerate(patches):
        by_layer.setdefault(p.target_layer, []).append(row)
    handles = []
    for layer, rows in by_layer.items():
        positions = [_target(patches[r])[1] for r in rows]
        vectors = torch.stack([patches[r].vector for r in rows]).to(view.device)
        hook = overwrite_hook(rows, positions, vectors, prefill_only)
        handles.append(view.blocks[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def greedy(view, x: torch.Tensor, n: int) -> list[list[int]]:
    """Hugging Face's greedy generate of `n` tokens after the rows of `x` (one prompt: no padding)."""
    out = view.model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=view.tokenizer.pad_token_id,
        eos_token_id=sorted(view.eos_token_ids) or None,
    )
    return out[:, x.shape[1] :].tolist()


@torch.no_grad()
def naive_logits(view, patch) -> torch.Tensor:
    """One HF forward of the whole target prompt with one hook on block l*: last-position logits."""
    with batch_hooks(view, [patch], prefill_only=False):
        return view.model(input_ids=torch.tensor([list(patch.target_ids)], device=view.device)).logits[0, -1].float()


@torch.no_grad()
def naive_generate(view, patch, n: int) -> list[int]:
    """HF greedy generate on the whole target prompt, the hook acting in the prefill only."""
    with batch_hooks(view, [patch], prefill_only=True):
        return greedy(view, torch.tensor([list(patch.target_ids)], device=view.device), n)[0]


@torch.no_grad()
def hf_loop(view, patches, new_tokens: int, batch: int) -> list:
    """The expert's loop: rows of one target prompt in batches of `batch`, one forward (or generate call)
    per batch with a hook per block l*, no prefix cache, the LM head on the last position only."""
    out = []
    for s in range(0, len(patches), batch):
        part = patches[s : s + batch]
        x = torch.tensor([list(p.target_ids) for p in part], device=view.device)
        with batch_hooks(view, part, prefill_only=new_tokens > 0):
            if new_tokens:
                out += greedy(view, x, new_tokens)
            else:
                out += view.model(input_ids=x, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
    return out


# --- workloads ------------------------------------------------------------------------------------------


def sources(view, texts, layers):
    return ps.capture(view, list(texts), layers=list(layers), positions=[-1])


def grid(view, prompt: str, placeholder: str, texts, pairs) -> list:
    """Patches of (source text, l, l*) cells into one target prompt."""
    target = ps.TargetPrompt(view, prompt, placeholder=placeholder)
    layers = sorted({s for s, _ in pairs})
    out = []
    for states in sources(view, texts, layers):  # one States per source text
        out += [target.patch(states.at(layer=s), layer=t) for s, t in pairs]
    return out


def workloads(view, sizes: Sizes) -> dict:
    """name -> (patches, new tokens, stops): the bench's rows at this model's scale."""
    n = view.n_blocks
    diagonal = [(b, b) for b in range(n)]
    full = [(s, t) for s in range(n) for t in range(n)]
    step = [b for b in range(n)][:: sizes.gen_step]
    other = list(range(n))[::2]
    entity = grid(view, DESCRIPTION, "x", ENTITIES[: sizes.entities], [(b, b) for b in other])
    return {
        "next token, l* = l": (grid(view, IDENTITY, "?", TEXTS[: sizes.sources], diagonal), 0, None),
        "next token, full grid": (grid(view, IDENTITY, "?", TEXTS[: sizes.grid_sources], full), 0, None),
        "attribute generation grid, 20 tokens": (
            grid(view, ATTRIBUTE, "x", ENTITIES[: sizes.subjects], [(s, t) for s in step for t in step]),
            20,
            None,
        ),
        "entity descriptions, 50 tokens, stops": (entity, 50, [StopAfterDescription()] * len(entity)),
    }


def run_engine(view, patches, new_tokens: int, stops) -> list:
    if not new_tokens:
        return ps.next_token(view, patches, top_k=1, batch_size="auto").token_ids
    if stops is None:
        return ps.generate(view, patches, max_new_tokens=new_tokens, batch_size="auto").token_ids
    return engine.generate(view, patches, max_new_tokens=new_tokens, batch_size="auto", stops=stops)


def timed(view, fn):
    """(output, seconds, forwards seen, block FLOPs, peak memory bytes) of fn()."""
    sync(view.device)
    memory_reset(view.device)
    with forwards(view) as (seen, flops):
        start = time.perf_counter()
        out = fn()
        sync(view.device)
        seconds = time.perf_counter() - start
    return out, seconds, seen, flops[0], memory_peak(view.device)


# --- (a) correctness ------------------------------------------------------------------------------------


@contextmanager
def exact_fp32():
    """fp32 with TF32 off: the matmuls the engine and the naive method run are plain fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def top2_gap(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


def check_next_token(view, work: dict, report: Report, shape: str, cells: int, rng) -> None:
    patches = rng.sample(work["next token, full grid"][0], min(cells, len(work["next token, full grid"][0])))
    fast = run_engine(view, patches, 0, None)
    naive = [naive_logits(view, p) for p in patches]
    wrong = [i for i, (f, nv) in enumerate(zip(fast, naive)) if f != int(nv.argmax())]
    report.add(
        {
            "section": "correctness",
            "shape": shape,
            "dtype": str(view.dtype).replace("torch.", ""),
            "readout": "next token (sampled grid cells)",
            "checked": len(patches),
            "equal": len(patches) - len(wrong),
            "equal_share": (len(patches) - len(wrong)) / len(patches),
            "top2_gaps_of_disagreements": [round(top2_gap(naive[i]), 5) for i in wrong],
        }
    )


def check_generation(view, work: dict, report: Report, shape: str, cells: int, tokens: int, rng) -> None:
    grid_rows = work["attribute generation grid, 20 tokens"][0]
    patches = rng.sample(grid_rows, min(cells, len(grid_rows)))
    fast = run_engine(view, patches, tokens, None)
    naive = [naive_generate(view, p, tokens) for p in patches]
    wrong = [i for i, (f, nv) in enumerate(zip(fast, naive)) if list(f) != nv]
    gaps = []
    for i in wrong:  # the gap at the first token where the two differ, read from the naive prefix
        k = next((j for j, (a, b) in enumerate(zip(fast[i], naive[i])) if a != b), 0)
        ids, pos = _target(patches[i])
        cut = engine.Patch(
            target_ids=tuple(ids + naive[i][:k]),
            target_position=pos,
            target_layer=patches[i].target_layer,
            vector=patches[i].vector,
        )
        gaps.append(round(top2_gap(naive_logits(view, cut)), 5))
    report.add(
        {
            "section": "correctness",
            "shape": shape,
            "dtype": str(view.dtype).replace("torch.", ""),
            "readout": f"patched generation, {tokens} tokens (sampled cells)",
            "checked": len(patches),
            "equal": len(patches) - len(wrong),
            "equal_share": (len(patches) - len(wrong)) / len(patches),
            "top2_gaps_of_disagreements": gaps,
        }
    )


def correctness(view, work: dict, report: Report, shape: str, sizes: Sizes, exact: bool) -> None:
    rng = random.Random(0)
    cells, gens = (sizes.exact_cells, sizes.exact_gens) if exact else (sizes.bf16_cells, sizes.bf16_gens)
    with exact_fp32() if exact else _nothing():
        if report.room_for(f"{shape} correctness next token"):
            with report.step():
                check_next_token(view, work, report, shape, cells, rng)
        if report.room_for(f"{shape} correctness generation"):
            with report.step():
                check_generation(view, work, report, shape, gens, sizes.check_tokens, rng)


@contextmanager
def _nothing():
    yield


# --- (b) speed and (c) memory -------------------------------------------------------------------------


def matmul_roof(view, rows: int, repeat: int = 10) -> float:
    """TFLOP/s of a (rows x width) @ (width x MLP width) matmul in the model's dtype on its device."""
    inner = view.model.config.intermediate_size
    a = torch.randn(rows, view.width, dtype=view.dtype, device=view.device)
    b = torch.randn(view.width, inner, dtype=view.dtype, device=view.device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeat):
        sync(view.device)
        start = time.perf_counter()
        a @ b
        sync(view.device)
        times.append(time.perf_counter() - start)
    return 2 * rows * view.width * inner / sorted(times)[len(times) // 2] / 1e12


def head_flops(view, reads: int) -> float:
    return 2.0 * view.vocab_size * view.width * reads


def generated(out, new_tokens: int) -> int:
    return sum(len(o) for o in out) if new_tokens else len(out)


def speed_row(view, report: Report, shape: str, name: str, work: tuple, roof: float, sizes: Sizes) -> None:
    patches, new_tokens, stops = work
    out, seconds, seen, flops, peak = timed(view, lambda: run_engine(view, patches, new_tokens, stops))
    tokens = generated(out, new_tokens)
    tflops = (flops + head_flops(view, tokens)) / seconds / 1e12
    estimate = weight_bytes(view) + max((rows * dry_run_bytes_per_row()(view, seq) for rows, seq in seen), default=0)
    hf_out, hf_s, _, hf_flops, hf_peak = timed(view, lambda: hf_loop(view, patches, new_tokens, sizes.hf_batch))
    row = {
        "section": "speed",
        "shape": shape,
        "row": name,
        "runs": len(patches),
        "seconds": seconds,
        "runs_per_s": len(patches) / seconds,
        "gen_tokens_per_s": tokens / seconds if new_tokens else None,
        "TFLOPs": tflops,
        "roof_TFLOPs": roof,
        "share_of_roof": tflops / roof,
        "hf_loop_seconds": hf_s,
        "hf_loop_gen_tokens_per_s": generated(hf_out, new_tokens) / hf_s if new_tokens else None,
        "speedup_vs_hf_loop": hf_s / seconds,
        "same_as_hf_loop": sum(list(a) == list(b)[: len(a)] for a, b in zip(_lists(out), _lists(hf_out))) / len(out),
    }
    report.add({k: v for k, v in row.items() if v is not None})
    kind = "GPU max_memory_allocated" if view.device.type == "cuda" else "process peak RSS (CPU; not allocations)"
    report.add(
        {
            "section": "memory",
            "shape": shape,
            "row": name,
            "measured": kind,
            "peak_GiB": peak / 2**30,
            "dry_run_estimate_GiB": estimate / 2**30,
            "weights_GiB": weight_bytes(view) / 2**30,
            "largest_forward_rows": max((r for r, _ in seen), default=0),
            "estimate_over_peak": estimate / peak,
            "hf_loop_peak_GiB": hf_peak / 2**30,
        }
    )


def _lists(out) -> list[list[int]]:
    return [list(o) if isinstance(o, (list, tuple)) else [o] for o in out]


def speed(view, work: dict, report: Report, shape: str, sizes: Sizes) -> None:
    run_engine(view, work["next token, l* = l"][0][:2], 0, None)  # warm-up: kernels, handles
    run_engine(view, work["attribute generation grid, 20 tokens"][0][:2], 2, None)
    hf_loop(view, work["attribute generation grid, 20 tokens"][0][:2], 2, 2)
    roof = matmul_roof(view, sizes.roof_rows)
    report.add({"section": "speed", "shape": shape, "row": "bf16 matmul roof", "roof_TFLOPs": roof})
    for name, rows in work.items():
        if report.room_for(f"{shape} {name}"):
            with report.step():
                speed_row(view, report, shape, name, rows, roof, sizes)


# --- main -----------------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda where there is one), cuda, cpu")
    parser.add_argument(
        "--shape", default=None, help="comma-separated: 7b,13b (the GPU default), tiny (the CPU default)"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop inside this many seconds")
    parser.add_argument("--out", default="outputs/gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tokenizer", default=None, help="a folder with the built-in tokenizer's files")
    parser.add_argument("--save-tokenizer", default=None, help="write the built-in tokenizer's files here and stop")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.shape is None:
        args.shape = "7b,13b" if args.device.type == "cuda" else "tiny"
    args.shapes = args.shape.split(",")
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        parser.error(f"--shape {bad[0]!r}: choose from {', '.join(SHAPES)}")
    return args


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_shape(shape: str, tokenizer, args, report: Report, first: bool) -> None:
    """The first shape runs the exact fp32 section; every shape then runs bf16 (built as a bf16 model is
    loaded: from_pretrained in bf16 keeps the rotary frequencies in fp32, a converted model would not)."""
    sizes = SIZES[args.device.type]
    if first:
        view = build(shape, tokenizer, args.device, torch.float32)
        correctness(view, workloads(view, sizes), report, shape, sizes, exact=True)
        del view
        free(args.device)
    if not report.room_for(f"{shape} bf16 build"):
        return
    view = build(shape, tokenizer, args.device, torch.bfloat16)
    report.meta[f"{shape}_bf16_parameters_B"] = round(sum(p.numel() for p in view.model.parameters()) / 1e9, 3)
    work = workloads(view, sizes)
    correctness(view, work, report, shape, sizes, exact=False)
    speed(view, work, report, shape, sizes)
    del view, work
    free(args.device)


def main(argv=None) -> int:
    args = parse(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.save_tokenizer:
        tokenizer.save_pretrained(args.save_tokenizer)
        print(f"saved the built-in tokenizer's files to {args.save_tokenizer}")
        return 0
    report = Report(Path(args.out), args.budget_s)
    report.meta.update(
        device=torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
        torch=torch.__version__,
        shapes=args.shape,
        budget_s=args.budget_s,
        vocab=len(tokenizer),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    print("  ".join(f"{k}={v}" for k, v in report.meta.items()))
    report.watchdog()
    for i, shape in enumerate(args.shapes):
        check_shape(shape, tokenizer, args, report, first=i == 0)
    report.meta["heavy_modules"] = [m for m in ("hydra", "omegaconf", "gguf") if m in sys.modules]
    report.add(
        {"section": "done", "elapsed_s": time.monotonic() - START, "heavy_modules": report.meta["heavy_modules"]}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
