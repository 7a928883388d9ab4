"""The architectures patchscan supports: one row per Hugging Face `model_type`.

Every architecture-specific fact lives in this table: where the blocks, the final norm, the input
embedding and the unembedding are, where each block's sub-modules are (for sites other than a
block's output), and which of the engine's fast paths were checked exact on the family (each one
against the naive reference on the family's tiny random model, tests/conftest.py). A family
outside the table is refused when a model loads, and `check` confirms, as nnterp does, that the
named modules exist with the types and widths the engine relies on, so a layout change in
transformers fails at load with one line rather than giving wrong states later.

To add an architecture: a row here, a tiny config (models.loading.TINY_CONFIGS and
configs/model/tiny_NAME.yaml) and its name in tests/conftest.py's matrix; then turn on the fast
paths whose equivalence tests pass on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from patchscan.errors import UserError


@dataclass(frozen=True)
class BlockParts:
    """Paths inside one decoder block, None where the family has no such module: the attention,
    the MLP, and the norm whose output is the MLP's input (GPT-J feeds one norm to both branches;
    OPT's MLP is two bare Linear layers, fc1 and fc2, with no module of its own)."""

    attention: str
    mlp: str | None
    mlp_norm: str | None


@dataclass(frozen=True)
class Family:
    """Where a family's modules are (paths from the CausalLM) and which fast paths it takes.

    padded_decoding: the forward takes per-row `position_ids` and a 2-D padding mask with a KV cache
    (as HF's generate passes them), so padded batches decode in our own loop (engine.decoding).
    shared_decoding: each block's decode step gets the hidden states rows first, a mask of one row
    per batch row (or None), position embeddings of batch 1 and the shared cache (engine.sharing).
    greedy_head: the CausalLM's logits are `unembedding(base_model(...).last_hidden_state)`, maybe
    soft-capped (engine.head)."""

    model_type: str
    blocks: str
    final_norm: str | None
    embedding: str
    unembedding: str | tuple[str, ...]  # several: the names transformers gave it over the supported range
    parts: BlockParts
    padded_decoding: bool = True
    shared_decoding: bool = True
    greedy_head: bool = True


_LLAMA_PARTS = BlockParts(attention="self_attn", mlp="mlp", mlp_norm="post_attention_layernorm")


def _llama_like(model_type: str, **kwargs) -> Family:
    return Family(model_type, "model.layers", "model.norm", "model.embed_tokens", "lm_head", _LLAMA_PARTS, **kwargs)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _llama_like("llama"),
        _llama_like("mistral"),
        _llama_like("qwen2"),
        _llama_like("qwen3"),
        Family(
            "gemma3_text",
            "model.layers",
            "model.norm",
            "model.embed_tokens",
            "lm_head",
            BlockParts(attention="self_attn", mlp="mlp", mlp_norm="pre_feedforward_layernorm"),
        ),
        Family(
            "gpt2", "transformer.h", "transformer.ln_f", "transformer.wte", "lm_head", BlockParts("attn", "mlp", "ln_2")
        ),
        Family(
            "gptj",
            "transformer.h",
            "transformer.ln_f",
            "transformer.wte",
            "lm_head",
            BlockParts("attn", "mlp", None),
        ),
        Family(
            "gpt_neox",
            "gpt_neox.layers",
            "gpt_neox.final_layer_norm",
            "gpt_neox.embed_in",
            ("lm_head", "embed_out"),  # embed_out before transformers 5
            BlockParts(attention="attention", mlp="mlp", mlp_norm="post_attention_layernorm"),
        ),
        Family(
            "opt",
            "model.decoder.layers",
            "model.decoder.final_layer_norm",
            "model.decoder.embed_tokens",
            "lm_head",
            BlockParts(attention="self_attn", mlp=None, mlp_norm="final_layer_norm"),
        ),
    )
}


def family_of(model_type: str, model: str = "the model") -> Family:
    """The table's row for a model_type; an unsupported one is refused with the supported ones named."""
    if model_type not in FAMILIES:
        raise UserError(
            f"{model} has model_type {model_type!r}, which patchscan does not support; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def module_at(root: nn.Module, path: str | tuple[str, ...]) -> nn.Module | None:
    """The sub-module a dotted path names (None where an attribute on the way is missing or None);
    of several paths (a module transformers renamed), the first that is there."""
    if isinstance(path, tuple):
        return next((m for m in (module_at(root, p) for p in path) if m is not None), None)
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def check(model: nn.Module, model_name: str = "the model") -> Family:
    """The family of a loaded CausalLM, after checking that the modules its row names are there with
    the expected types and widths (no forward pass runs). A mismatch is one line naming it."""
    family = family_of(model.config.model_type, model_name)
    for problem in _layout_problems(model, family):
        raise UserError(f"{model_name} does not have the layout of patchscan's {family.model_type!r} family: {problem}")
    return family


def _layout_problems(model: nn.Module, family: Family) -> Iterator[str]:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    blocks = module_at(model, family.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) != text.num_hidden_layers:
        yield f"{family.blocks} is not a list of its {text.num_hidden_layers} blocks"
        return
    found = {
        "final norm": (family.final_norm, nn.Module, None),
        "embedding": (family.embedding, nn.Embedding, model.get_input_embeddings()),
        "unembedding": (family.unembedding, nn.Linear, model.get_output_embeddings()),
    }
    for name, (path, kind, expected) in found.items():
        module = module_at(model, path) if path else None
        where = " or ".join(path) if isinstance(path, tuple) else path
        if path and not isinstance(module, kind):
            yield f"no {name} ({kind.__name__}) at {where}"
        elif expected is not None and module is not expected:
            yield f"{where} is not the model's {name}"
        elif name != "final norm" and _width(module) != text.hidden_size:  # e.g. OPT's project_in/out
            yield f"its {name} {where} has width {_width(module)}, its blocks {text.hidden_size}"
    for part, path in vars(family.parts).items():
        if path is not None and any(module_at(block, path) is None for block in blocks):
            yield f"a block has no {part} at {path}"


def _width(module: nn.Module) -> int:
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
