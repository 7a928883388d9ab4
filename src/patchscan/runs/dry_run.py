"""Plan before you spend: what a config will do, without loading weights (`runner.dry_run=true`,
`patchscan plan ...`).

    patchscan plan +experiment=attribute_extraction model=llama2_13b model.config_path=config.json

The model is built from its Hugging Face config on the `meta` device (exact parameter count, no
memory), wrapped in a `CountingView` that tokenizes with the model's tokenizer where one is available
without weights (else the built-in tokenizer, and token counts are approximate). The scope then
runs its own `bind`, `examples` and `run_chunk` unchanged, chunk by chunk as the runner would,
with a `CountingEngine` in place of the batched engine: the engine's own schedulers (the same
prefix groups, micro-batch sizes from the same memory estimate, the same layer-aware cuts, the
same batch loops) hand each micro-batch to a `CountingBackend`, which counts forward passes,
tokens and memory instead of running them and returns stand-in outputs. Data-dependent steps
take their upper bound: every generated row runs `max_new_tokens` steps (no early
end-of-sequence) and filters keep every example.
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from patchscan import engine
from patchscan.engine.batching import rows_for_budget
from patchscan.engine.counting import Counts, count_work
from patchscan.engine.patching import Backend, TopK, bytes_per_row
from patchscan.errors import UserError
from patchscan.models.loading import (
    DEFAULT_BUILTIN,
    _gguf_path,
    builtin_cache_folder,
    builtin_spec,
    builtin_tokenizer,
    resolve_device,
    resolve_dtype,
    tiny_config,
)
from patchscan.models.view import ModelView

log = logging.getLogger(__name__)
CPU_RUNTIME_BYTES = 0.6 * 2**30  # Python, torch, transformers and tokenizer of a CPU process (measured: 0.5-0.7 GiB)
STAND_IN_NOTE = (
    "the model's tokenizer is not available without its files: "
    "token counts use the built-in tokenizer as a stand-in and are approximate"
)


def hf_config(model_cfg) -> tuple[object, object | None, str]:
    """(HF config, tokenizer or None, where the config came from) for a model config, reading no weights."""
    from transformers import AutoConfig, AutoTokenizer

    path = model_cfg.get("config_path")
    source = model_cfg.get("source", "hub")
    if path:
        path = Path(str(path))
        folder = path if path.is_dir() else path.parent
        if not (path / "config.json" if path.is_dir() else path).is_file():
            raise UserError(f"model.config_path: no config.json at {path}")
        config = AutoConfig.from_pretrained(folder if path.is_dir() else str(path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return config, tokenizer, str(path)
    if source == "tiny":
        tokenizer = builtin_tokenizer(convert=False)
        return tiny_config(model_cfg.get("arch", ""), tokenizer, model_cfg.get("config")), tokenizer, "tiny"
    if source == "builtin":
        name = model_cfg.get("builtin")
        folder = builtin_cache_folder(name)
        if (folder / "config.json").exists():  # converting would read the weights: else the GGUF's header
            return AutoConfig.from_pretrained(folder), builtin_tokenizer(name, convert=False), str(folder)
        with tempfile.TemporaryDirectory() as scratch:  # chunked packages are assembled first
            gguf = _gguf_path(builtin_spec(name or DEFAULT_BUILTIN), Path(scratch))
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name), None, str(gguf.name)
    where = model_cfg.get("path") or model_cfg.get("id")
    try:
        if source == "gguf":
            config = AutoConfig.from_pretrained(Path(where).parent, gguf_file=Path(where).name)
            return config, None, str(where)
        config = AutoConfig.from_pretrained(where, revision=model_cfg.get("revision"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read the config of {where!r} ({str(exc).splitlines()[0]}); point at its "
            "config.json with model.config_path=FILE"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return config, tokenizer, str(where)


class _StandInEmbedding(torch.nn.Module):
    """Input embeddings standing in for a meta model's: one value per token, as distinct as real ones."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (-1.0 - ids.float()).unsqueeze(-1).expand(*ids.shape, self.width)


class CountingView(ModelView):
    """A ModelView of a model built on the `meta` device: shapes and tokenizer, no weights. What an
    experiment reads from the model itself (input embeddings, read-outs) are stand-ins on the CPU."""

    def __init__(self, model, tokenizer, name: str, device: torch.device):
        self._planned_device = device
        super().__init__(model=model, tokenizer=tokenizer, name=name)

    @property
    def device(self) -> torch.device:
        return self._planned_device

    @property
    def input_device(self) -> torch.device:
        return torch.device("cpu")  # the stand-ins' device; `device` is the planned one, for the memory budget

    @property
    def embed(self) -> torch.nn.Module:
        return _StandInEmbedding(self.width)

    def _probe_block_output(self) -> bool:
        return True

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*hidden.shape[:-1], self.unembed.weight.shape[0]))

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def counting_view(model_cfg) -> tuple[CountingView, str, str | None]:
    """A CountingView for a model config; (view, where its config came from, a note or None)."""
    from transformers import AutoModelForCausalLM

    config, tokenizer, where = hf_config(model_cfg)
    note = None
    if tokenizer is None:
        tokenizer, note = builtin_tokenizer(convert=False), STAND_IN_NOTE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = resolve_device(model_cfg.get("device"))
    dtype = resolve_dtype(model_cfg.get("dtype"), device)  # as load_model resolves it: auto is bf16 on a GPU
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    name = str(model_cfg.get("name") or model_cfg.get("id") or model_cfg.get("source"))
    return CountingView(model, tokenizer, name, device), where, note


class _CountingPrefixCache:
    """Which target prefixes the engine's PrefixCache would compute (same capacity, LRU): a miss is
    one forward of the prefix."""

    def __init__(self, backend: CountingBackend, view, capacity: int):
        self.backend, self.view, self.capacity, self.store = backend, view, capacity, OrderedDict()

    def get(self, prefix: tuple) -> None:
        if not prefix:
            return
        if prefix in self.store:
            self.store.move_to_end(prefix)
            return
        self.backend.forward(self.view, 1, len(prefix), len(prefix))
        if self.capacity > 0:
            self.store[prefix] = True
            while len(self.store) > self.capacity:
                self.store.popitem(last=False)


@dataclass
class CountingBackend(Backend):
    """The engine's model work, counted: the engine's own schedulers (`engine.patching`,
    `engine.capture`) call it micro-batch by micro-batch as they would the model, and it adds up
    forward passes, token positions and the largest micro-batch's memory (`bytes_per_row`, the
    engine's own estimate), and returns stand-in outputs of the real ones' shapes: every generated
    row runs `max_new_tokens` steps (no early end), states distinct per (prompt, position, block)."""

    gpu_memory_gb: float | None = None
    counts: Counts = field(default_factory=Counts)
    batch_sizes: set = field(default_factory=set)  # micro-batch sizes the memory budget allows
    largest_batch: int = 0
    peak_batch_bytes: int = 0
    state_ids: dict = field(default_factory=dict)  # (prompt ids, position, block) -> its stand-in state's value

    def forward(self, view, rows: int, positions: int, seq_len: int) -> None:
        self.counts.forward_passes += 1
        self.counts.forward_tokens += rows * positions
        self.largest_batch = max(self.largest_batch, rows)
        self.peak_batch_bytes = max(self.peak_batch_bytes, rows * bytes_per_row(view, seq_len))

    def batch_size(self, view, batch_size, seq_len: int, budget_gb) -> int:
        if (
            batch_size in (None, "auto", 0)
            and budget_gb is None
            and view.device.type == "cuda"
            and not torch.cuda.is_available()
        ):
            # a dry run may plan for a GPU this machine lacks: runner.gpu_memory_gb (80) stands in for its free memory
            free = (self.gpu_memory_gb or 80.0) * 2**30 - view.weight_bytes
            size = rows_for_budget(bytes_per_row(view, seq_len), torch.device("cpu"), 0.8 * free / 2**30)
        else:
            size = super().batch_size(view, batch_size, seq_len, budget_gb)
        self.batch_sizes.add(size)
        return size

    def prefix_cache(self, view, capacity: int) -> _CountingPrefixCache:
        return _CountingPrefixCache(self, view, capacity)

    def greedy_head(self, view) -> None:
        return None

    def fit_affine(self, x: torch.Tensor, y: torch.Tensor, ridge: float) -> StandInMap:
        return StandInMap(y.shape[-1])

    def cached_maps(self, folder, files: dict, shape: tuple[int, int], fit) -> dict:
        return fit()  # counted as a first run fits them; the map cache is neither read nor written

    def capture(self, view, batch, positions, layers, want, with_logprobs, site="resid_post"):
        width = max(len(p) for p in batch)
        self.forward(view, len(batch), width, width)
        states = torch.empty(len(layers), sum(map(len, positions)), view.width)
        row = 0
        for ids, pos in zip(batch, positions):
            for position in pos:
                for i, layer in enumerate(layers):  # one value per (prompt, position, block, site), so the
                    key = (tuple(ids), position, layer, site)  # runs identical for the real engine are so here
                    states[i, row] = self.state_ids.setdefault(key, stand_in_value(len(self.state_ids)))
                row += 1
        states[..., -1] = 1.0  # one fixed entry: α·h of one state never equals β·h of another (superscopes)
        return states, (torch.zeros(1, view.vocab_size).expand(row, -1) if with_logprobs else None)

    def logits(self, view, cache, patches, rows, skip):
        first = patches[rows[0]]
        ids, position = first.target_ids, first.target_position
        cache.get(ids[:position])
        self.forward(view, len(rows), len(ids) - position, len(ids))
        return torch.zeros(1, view.vocab_size).expand(len(rows), -1)

    def top_k(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stand-in best tokens (the first k ids, log-probability 0), with no pass over the vocabulary."""
        n = logits.shape[0]
        return torch.arange(k).expand(n, k), torch.zeros(n, k)

    def _decode(self, view, rows: int, seq_len: int, steps: int) -> list[list[int]]:
        """Greedy decoding after a prefill: `steps - 1` one-token forwards; stand-in tokens, `steps` a row."""
        if steps > 1:
            self.forward(view, rows, 1, seq_len)
            self.counts.forward_passes += steps - 2
            self.counts.forward_tokens += rows * (steps - 2)
        tokens = stand_in_tokens(view, steps)
        return [list(tokens) for _ in range(rows)]

    def plain_generate(self, view, prompts, max_new_tokens: int, stops) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        self.forward(view, len(prompts), width, width + max_new_tokens)
        return self._decode(view, len(prompts), width + max_new_tokens, max_new_tokens)

    def generate_parts(self, view, cache, head, patches, parts, stops, max_new_tokens: int, share: bool):
        for part in parts:
            ids, position = patches[part[0]].target_ids, patches[part[0]].target_position
            cache.get(ids[:position])
            self.forward(view, len(part), len(ids) - position, len(ids) + max_new_tokens)
        width = max(len(patches[part[0]].target_ids) for part in parts) + max_new_tokens
        return self._decode(view, sum(map(len, parts)), width, max_new_tokens)


def stand_in_value(k: int) -> float:
    """The k-th distinct stand-in state's value: k + 1 plus a seeded random fraction, so that a mean of
    several (the `mean` control) equals none of them, as with real states (equal runs merge alike; a
    fraction linear in k would make the mean of an evenly spaced set one of its members)."""
    return float(k + 1) + random.Random(k).random() * 0.5 + 0.25


class StandInMap:
    """A fitted map standing in for a least-squares one: a state's mean, repeated over the output width.
    Stand-in states are constant vectors but their last entry, one value per (prompt, position, block,
    site): their means stay distinct."""

    kind = "stand-in"

    def __init__(self, width: int):
        self.width = width

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h.float().mean(-1, keepdim=True).expand(*h.shape[:-1], self.width).to(h.dtype)


def stand_in_tokens(view, n: int) -> list[int]:
    """`n` generated tokens standing in for a real continuation: an ordinary token (no EOS: no early end)."""
    special = set(view.tokenizer.all_special_ids)
    token = next(t for t in range(view.vocab_size) if t not in special)
    return [token] * n


class CountingEngine:
    """Stands in for `patchscan.engine` in a dry run: the engine's own `capture`, `generate` and
    `patched_next_token`, every micro-batch answered by a `CountingBackend`; the experiment runs
    unchanged. Also counts the patched runs (`cells`), unpatched generations and captured prompts.

    `planning` is read by the filters, which stand-in outputs cannot decide (`Experiment.planning`)."""

    planning = True

    def __init__(self, gpu_memory_gb: float | None = None):
        self.backend = CountingBackend(gpu_memory_gb)
        self.cells = self.unpatched = self.captured = 0

    @property
    def counts(self) -> Counts:
        return self.backend.counts

    def fit_lens_maps(self, view, texts, layers, *args, **kwargs):
        return engine.fit_lens_maps(view, texts, layers, *args, backend=self.backend, **kwargs)

    def fit_cross_model_maps(self, source, target, texts, pairs, *args, **kwargs):
        return engine.fit_cross_model_maps(source, target, texts, pairs, *args, backend=self.backend, **kwargs)

    def capture(self, view, prompts, layers, positions, **kwargs):
        self.captured += len(prompts)
        return engine.capture(view, prompts, layers, positions, backend=self.backend, **kwargs)

    def generate(self, view, patches, **kwargs):
        self.cells += sum(p.vector is not None for p in patches)
        self.unpatched += sum(p.vector is None for p in patches)
        with count_work(None) as counted:  # the tokens the engine reports it generated (note_generated)
            out = engine.generate(view, patches, backend=self.backend, **kwargs)
        self.backend.counts.tokens_generated += counted.tokens_generated
        return out

    @staticmethod
    def embed_texts(texts: list[str]) -> torch.Tensor:
        """Stand-ins for the sentence embeddings (MiniLM's 384 dimensions): a dry run loads no model."""
        return torch.zeros(len(texts), 384)

    def patched_next_token(self, view, patches, **kwargs) -> TopK:
        self.cells += sum(p.vector is not None for p in patches)
        return engine.patched_next_token(view, patches, backend=self.backend, **kwargs)


@dataclass
class Plan:
    """What a run will do; `report()` prints it."""

    experiment: str
    model: str
    config_from: str
    dtype: str
    device: str
    n_parameters: int
    weight_bytes: int
    examples: int
    examples_total: int
    shard: int
    num_shards: int
    chunks: int
    examples_per_part: int
    counts: Counts
    cells: int
    unpatched: int
    captured: int
    batch_sizes: list[int]
    largest_batch: int
    activation_bytes: int
    runtime_bytes: int
    notes: list[str]

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.runtime_bytes

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "counts"}
        return {**out, **self.counts.as_dict(), "peak_bytes": self.peak_bytes}

    def report(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        sizes = (
            (
                f"{min(self.batch_sizes)}"
                if len(set(self.batch_sizes)) == 1
                else f"{min(self.batch_sizes)}-{max(self.batch_sizes)}"
            )
            if self.batch_sizes
            else "-"
        )
        runtime = f" + {gib(self.runtime_bytes)} process runtime" if self.runtime_bytes else ""
        lines = [
            f"plan (dry run, no weights loaded): {self.experiment} on {self.model} ({self.n_parameters / 1e9:.3f} B "
            f"parameters; config: {self.config_from}), {self.dtype} on {self.device}",
            f"  examples:            {self.examples} (shard {self.shard} of {self.num_shards}; {self.examples_total} "
            f"after dataset.limit), {self.chunks} chunks of up to {self.examples_per_part}",
            f"  cells (patched runs): {self.cells}; unpatched generations: {self.unpatched}; source prompts captured: "
            f"{self.captured}",
            f"  forward passes:      {self.counts.forward_passes} ({self.counts.forward_tokens} token positions)",
            f"  tokens generated:    {self.counts.tokens_generated} at most (max_new_tokens per generated row)",
            f"  micro-batch:         {sizes} rows allowed by the memory budget; largest used {self.largest_batch}",
            f"  peak memory:         {gib(self.peak_bytes)} = {gib(self.weight_bytes)} weights + "
            f"{gib(self.activation_bytes)} largest micro-batch (KV cache, logits, activations){runtime}",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def check_fits(cfg: DictConfig) -> dict[str, tuple]:
    """Refuse, before any run dir is accepted, a generation that cannot fit by the dry run's memory
    estimate: the weights and one row (`bytes_per_row` at `generation.max_new_tokens`) against the
    device's whole memory (the GPU's, `runner.gpu_memory_gb` for one this machine lacks, or the RAM).
    Returns the counting views it built, by config key, for `make_plan` to reuse (building one is most
    of a dry run's start-up)."""
    steps = (cfg.get("generation") or {}).get("max_new_tokens")
    if not steps:
        return {}
    key = "target_model" if cfg.get("target_model") else "model"  # the model that generates
    built = counting_view(cfg[key])
    view = built[0]
    row = bytes_per_row(view, int(steps))
    if view.device.type == "cuda":
        gpu = cfg.runner.get("gpu_memory_gb")
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(view.device).total_memory
        else:
            total = float(gpu or 80.0) * 2**30
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if view.weight_bytes + row > total:
        raise UserError(
            f"generation.max_new_tokens={steps}: one generated row needs {row / 2**30:.1f} GiB (KV cache, logits, "
            f"activations) beside {view.weight_bytes / 2**30:.1f} GiB of weights of {cfg[key].get('name') or key}, "
            f"over the {total / 2**30:.1f} GiB of {view.device}"
        )
    return {key: built}


def make_plan(cfg: DictConfig, scope, views: dict[str, tuple] | None = None) -> Plan:
    """Run the scope's own code on a meta-device model with the counting engine; return the plan.
    `views`: counting views already built for these configs (check_fits'), by config key."""
    from patchscan.runs.runner import shard_examples

    views = dict(views or {})
    view, where, note = views.get("model") or counting_view(cfg.model)
    engine = CountingEngine(cfg.runner.get("gpu_memory_gb"))
    scope.engine = engine
    if cfg.get("target_model"):  # cross_model's M*
        targets = [(views.get("target_model") or counting_view(cfg.target_model))[0]]
    else:
        targets = []
    scope.bind(view, *targets)
    examples = scope.examples()  # with the `mean` control, its states are captured here: set-up too
    setup = Counts(**engine.counts.as_dict())
    for i, example in enumerate(examples):
        example["_index"] = i
    num_shards, shard = int(cfg.runner.num_shards), int(cfg.runner.shard)
    mine = shard_examples(examples, num_shards, shard)
    per_part = int(cfg.runner.examples_per_part)
    engine.backend.counts = Counts()
    for start in range(0, len(mine), per_part):
        scope.run_chunk(mine[start : start + per_part], lambda n: None)
    notes = [note] if note else []
    if setup.forward_passes:
        notes.append(
            f"{setup.forward_passes} more forward passes before the chunks (fitting maps, cached after a run; "
            "the mean control's states)"
        )
    if cfg.get("filter") or (cfg.get("multihop") and cfg.multihop.get("require_single_hops")):
        notes.append("upper bound: assumes every example passes the filter")
    return Plan(
        cfg.experiment.name,
        view.name,
        where,
        str(view.dtype).replace("torch.", ""),
        str(view.device),
        view.n_parameters,
        view.weight_bytes,
        len(mine),
        len(examples),
        shard,
        num_shards,
        math.ceil(len(mine) / per_part),
        per_part,
        engine.counts,
        engine.cells,
        engine.unpatched,
        engine.captured,
        sorted(engine.backend.batch_sizes),
        engine.backend.largest_batch,
        engine.backend.peak_batch_bytes,
        CPU_RUNTIME_BYTES if view.device.type == "cpu" else 0,
        notes,
    )
