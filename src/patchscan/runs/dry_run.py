"""Plan before you spend: what a config will do, without loading weights (`runner.dry_run=true`,
`patchscan plan ...`).

    patchscan plan +experiment=attribute_extraction model=llama2_13b model.config_path=config.json

The model is built from its Hugging Face config on the `meta` device (exact parameter count, no
memory), wrapped in a `PlanView` that tokenizes with the model's tokenizer where one is available
without weights (else the built-in tokenizer, and token counts are approximate). The scope then
runs its own `bind`, `examples` and `run_chunk` unchanged, chunk by chunk as the runner would,
with `CountingEngine` in place of the batched engine: it schedules every call as the engine does
(the same prefix groups, micro-batch sizes from the same memory estimate, the same
layer-aware cuts) and counts forward passes, tokens and memory instead of running them. Data-
dependent steps take their upper bound: every generated row runs `max_new_tokens` steps (no early
end-of-sequence) and filters keep every example.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from patchscan.engine.batching import rows_for_budget
from patchscan.engine.capture import Captured, resolve_position
from patchscan.engine.counting import Counts
from patchscan.engine.identical import identical_runs
from patchscan.engine.kv import caches_merge
from patchscan.engine.patching import _SKIPS, TopK, _batch_size, _by_group, _groups, _micro_batches, bytes_per_row
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


class PlanView(ModelView):
    """A ModelView of a model built on the `meta` device: shapes and tokenizer, no weights."""

    def __init__(self, model, tokenizer, name: str, device: torch.device):
        self._planned_device = device
        super().__init__(model=model, tokenizer=tokenizer, name=name)

    @property
    def device(self) -> torch.device:
        return self._planned_device

    @property
    def input_device(self) -> torch.device:
        return self._planned_device

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


def plan_view(model_cfg) -> tuple[PlanView, str, str | None]:
    """A PlanView for a model config; (view, where its config came from, a note or None)."""
    from transformers import AutoModelForCausalLM

    config, tokenizer, where = hf_config(model_cfg)
    note = None
    if tokenizer is None:
        tokenizer, note = builtin_tokenizer(convert=False), STAND_IN_NOTE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = resolve_dtype(model_cfg.get("dtype"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    name = str(model_cfg.get("name") or model_cfg.get("id") or model_cfg.get("source"))
    return PlanView(model, tokenizer, name, resolve_device(model_cfg.get("device"))), where, note


class _PrefixLru:
    """Which target prefixes the engine's PrefixCache would have to compute (same capacity, LRU)."""

    def __init__(self, capacity: int):
        self.capacity, self.store = capacity, OrderedDict()

    def miss(self, prefix: tuple) -> bool:
        if not prefix:
            return False
        if prefix in self.store:
            self.store.move_to_end(prefix)
            return False
        if self.capacity > 0:
            self.store[prefix] = True
            while len(self.store) > self.capacity:
                self.store.popitem(last=False)
        return True


@dataclass
class CountingEngine:
    """Stands in for `patchscan.engine` in a dry run: schedules as the engine does, counts, returns zeros."""

    view: PlanView
    gpu_memory_gb: float | None = None
    planning: bool = True
    counts: Counts = field(default_factory=Counts)
    cells: int = 0  # patched runs
    unpatched: int = 0  # unpatched generations (baselines, filters)
    captured: int = 0  # source prompts captured
    batch_sizes: set = field(default_factory=set)  # micro-batch sizes the memory budget allows
    largest_batch: int = 0
    peak_batch_bytes: int = 0
    state_ids: dict = field(default_factory=dict)  # (prompt ids, position, block) -> its stand-in state's value

    def _forward(self, rows: int, positions: int, seq_len: int) -> None:
        self.counts.forward_passes += 1
        self.counts.forward_tokens += rows * positions
        self.largest_batch = max(self.largest_batch, rows)
        self.peak_batch_bytes = max(self.peak_batch_bytes, rows * bytes_per_row(self.view, seq_len))

    def _size(self, batch_size, seq_len: int, budget_gb) -> int:
        if (
            batch_size in (None, "auto", 0)
            and budget_gb is None
            and self.view.device.type == "cuda"
            and not torch.cuda.is_available()
        ):
            free = (self.gpu_memory_gb or 80.0) * 2**30 - self.view.weight_bytes
            size = rows_for_budget(bytes_per_row(self.view, seq_len), torch.device("cpu"), 0.8 * free / 2**30)
        else:
            size = _batch_size(self.view, batch_size, seq_len, budget_gb)
        self.batch_sizes.add(size)
        return size

    def capture(
        self, view, prompts, layers, positions, batch_size: int = 32, with_logprobs: bool = False, site="resid_post"
    ):
        layers = [view.check_layer(layer) for layer in layers]
        view.site(site)  # refused as the engine refuses it
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            self._forward(len(batch), width, width)
            for b, ids in enumerate(batch):
                pos = [resolve_position(p, len(ids), "source position") for p in positions[start + b]]
                logprobs = torch.zeros(len(pos), view.unembed.weight.shape[0]) if with_logprobs else None
                out.append(Captured(layers, pos, self._stand_ins(view, ids, layers, pos), logprobs))
        self.captured += len(prompts)
        return out

    def _stand_ins(self, view, ids, layers: list[int], positions: list[int]) -> torch.Tensor:
        """States that stand in for captured ones: one value per (prompt, position, block), so runs the
        real engine finds identical (one state patched twice: engine.identical) are identical here too."""
        states = torch.empty(len(layers), len(positions), view.width)
        for i, layer in enumerate(layers):
            for j, position in enumerate(positions):
                key = (tuple(ids), position, layer)
                states[i, j] = self.state_ids.setdefault(key, float(len(self.state_ids) + 1))
        return states

    def _prefill_and_decode(self, rows: int, suffix: int, seq_len: int, steps: int) -> None:
        self._forward(rows, suffix, seq_len)
        self._decode(rows, seq_len, steps)

    def _decode(self, rows: int, seq_len: int, steps: int) -> None:
        """Greedy decoding after a prefill: one-token forwards, and the tokens they generate."""
        for _ in range(steps - 1):
            self._forward(rows, 1, seq_len)
        self.counts.tokens_generated += rows * steps

    def generate(
        self,
        view,
        patches,
        max_new_tokens: int = 20,
        batch_size=256,
        reuse_prefix: bool = True,
        progress=None,
        memory_budget_gb=None,
        stops=None,  # rows that stop early only lower the work: the plan keeps its upper bound
        share_lower_blocks=True,  # so does sharing blocks 0..ℓ* between rows
    ):
        rows = [p.resolved(view) for p in patches]
        self.cells += sum(p.vector is not None for p in rows)
        self.unpatched += sum(p.vector is None for p in rows)
        patches = [rows[g[0]] for g in identical_runs(rows)]  # as the engine: identical runs once
        plain = sorted((i for i, p in enumerate(patches) if p.vector is None), key=lambda i: len(patches[i].target_ids))
        if plain:
            longest = len(patches[plain[-1]].target_ids)
            size = self._size(batch_size, longest + max_new_tokens, memory_budget_gb)
            for s in range(0, len(plain), size):
                batch = plain[s : s + size]
                width = max(len(patches[i].target_ids) for i in batch)
                self._prefill_and_decode(len(batch), width, width + max_new_tokens, max_new_tokens)
        lru = _PrefixLru(8 if reuse_prefix else 0)
        groups = _groups(patches, patched_only=True)
        flat = [i for indices in groups.values() for i in indices]
        if flat:  # as the engine: batches across target prompts, one prefill per prompt, decoded as one
            longest = max(len(ids) for ids, _, _ in groups)
            size = self._size(batch_size, longest + max_new_tokens, memory_budget_gb)
            merges = caches_merge(view.model.config)
            for s in range(0, len(flat), size):
                parts = _by_group(patches, flat[s : s + size])
                for batch in [parts] if merges or len(parts) == 1 else [[part] for part in parts]:
                    for part in batch:
                        ids, position = patches[part[0]].target_ids, patches[part[0]].target_position
                        if lru.miss(ids[:position]):
                            self._forward(1, position, position)
                        self._forward(len(part), len(ids) - position, len(ids) + max_new_tokens)
                    width = max(len(patches[part[0]].target_ids) for part in batch) + max_new_tokens
                    self._decode(sum(map(len, batch)), width, max_new_tokens)
        return [[] for _ in rows]

    def patched_next_token(
        self,
        view,
        patches,
        top_k: int = 5,
        batch_size=256,
        reuse_prefix: bool = True,
        skip_blocks_below: bool = True,
        progress=None,
        memory_budget_gb=None,
    ) -> TopK:
        patches = [p.resolved(view) for p in patches]
        lru = _PrefixLru(8 if reuse_prefix else 0)
        for (ids, position, site), indices in _groups(patches).items():
            skip = (
                skip_blocks_below
                and site in _SKIPS
                and position == len(ids) - 1
                and all(patches[i].vector is not None for i in indices)
            )
            size = self._size(batch_size, len(ids), memory_budget_gb)
            for chunk in _micro_batches(view, indices, patches, size, skip):
                if lru.miss(ids[:position]):
                    self._forward(1, position, position)
                self._forward(len(chunk), len(ids) - position, len(ids))
            self.cells += sum(1 for i in indices if patches[i].vector is not None)
        return TopK(torch.zeros((len(patches), top_k), dtype=torch.long), torch.zeros((len(patches), top_k)))


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


def make_plan(cfg: DictConfig, scope) -> Plan:
    """Run the scope's own code on a meta-device model with the counting engine; return the plan."""
    from patchscan.runs.runner import shard_examples

    view, where, note = plan_view(cfg.model)
    engine = CountingEngine(view, cfg.runner.get("gpu_memory_gb"))
    scope.engine = engine
    scope.bind(view)
    setup = Counts(**engine.counts.as_dict())
    examples = scope.examples()
    for i, example in enumerate(examples):
        example["_index"] = i
    num_shards, shard = int(cfg.runner.num_shards), int(cfg.runner.shard)
    mine = shard_examples(examples, num_shards, shard)
    per_part = int(cfg.runner.examples_per_part)
    engine.counts = Counts()
    for start in range(0, len(mine), per_part):
        scope.run_chunk(mine[start : start + per_part], lambda n: None)
    notes = [note] if note else []
    if setup.forward_passes:
        notes.append(f"{setup.forward_passes} more forward passes before the chunks (fitting maps; cached after a run)")
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
        sorted(engine.batch_sizes),
        engine.largest_batch,
        engine.peak_batch_bytes,
        CPU_RUNTIME_BYTES if view.device.type == "cpu" else 0,
        notes,
    )
