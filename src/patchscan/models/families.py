"""The architectures patchscan supports: one row per Hugging Face `model_type`.

Every architecture-specific fact lives in this table: where the blocks, the final norm, the input
embedding and the unembedding are, where each block's sub-modules are and the sites they give
(`SITES`: resid_post, the block's output, and the sub-module sites of `SitePoint`; a site a family
lacks is a one-line refusal in its row), and which of the engine's fast paths were checked exact on the family (each one
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from patchscan.errors import UserError

if TYPE_CHECKING:  # torch is imported where a model is checked, so config checks can read SITES cheaply
    from torch import nn


@dataclass(frozen=True)
class BlockParts:
    """Paths inside one decoder block, None where the family has no such module: the attention,
    the MLP, and the norm whose output is the MLP's input (GPT-J feeds one norm to both branches;
    OPT's MLP is two bare Linear layers, fc1 and fc2, with no module of its own)."""

    attention: str
    mlp: str | None
    mlp_norm: str | None


# The sites of a block (issue 28), the same names on every family. resid_post is the block's output
# (the default: every state before sites existed); the others are sub-module inputs and outputs.
SITES = ("resid_post", "resid_mid", "attn_out", "mlp_in", "mlp_out")
DEFAULT_SITE = "resid_post"


@dataclass(frozen=True)
class SitePoint:
    """Where a site is inside a block: a sub-module path and what of it the site is.

    kind "output": the module's output (its first item when a tuple), read and replaced by a
    forward hook; "input": its first positional input, read and replaced by a pre-hook (the module
    sees the new tensor, nothing else does); "stream": its first input *is* the residual stream
    there (the block adds to that very tensor afterwards), so a patch writes it in place and both
    the module and the block's sum see it. `unless`: a config flag that, when true, removes the
    site (GPT-NeoX's use_parallel_residual), with `refusal` saying why."""

    path: str
    kind: str
    unless: str | None = None
    refusal: str = ""


def _sites(parts: BlockParts, parallel: bool | str = False, flat_mlp: bool = False) -> dict[str, SitePoint | str]:
    """The site table of a family from its block parts; a string is the one-line refusal.

    parallel: attention and MLP read the same input and add to the block's input together, so there
    is no residual between them (True, or the config flag that says so). flat_mlp: the MLP runs on
    tokens flattened to (rows * tokens, width) by bare Linear layers (OPT), which a (row, position)
    index does not address."""
    sites: dict[str, SitePoint | str] = {"attn_out": SitePoint(parts.attention, "output")}
    if flat_mlp or parts.mlp is None:
        why = "its MLP is bare Linear layers on tokens flattened across rows (no MLP module of its own)"
        sites.update({s: why for s in ("resid_mid", "mlp_in", "mlp_out")})
        return sites
    sites["mlp_in"] = SitePoint(parts.mlp, "input")
    sites["mlp_out"] = SitePoint(parts.mlp, "output")
    no_mid = "attention and MLP run in parallel on the block's input, so there is no residual between them"
    if parallel is True or parts.mlp_norm is None:
        sites["resid_mid"] = no_mid
    else:
        sites["resid_mid"] = SitePoint(parts.mlp_norm, "stream", unless=parallel or None, refusal=no_mid)
    return sites


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
    sites: dict = field(default=None, compare=False)  # site -> SitePoint or its refusal; None: from `parts`

    def __post_init__(self) -> None:
        if self.sites is None:
            object.__setattr__(self, "sites", _sites(self.parts))

    def site(self, name: str, config=None) -> SitePoint | None:
        """Where site `name` is in a block (None: the block's output, resid_post); an unknown site, or
        one this family (or this model's config) does not have, is refused with one line."""
        if name == DEFAULT_SITE:
            return None
        if name not in SITES:
            raise UserError(f"unknown site {name!r}; sites: {', '.join(SITES)}")
        point = self.sites.get(name, "it is not in the family table")
        if isinstance(point, SitePoint) and point.unless and getattr(config, point.unless, False):
            point = f"{point.refusal} ({point.unless}=True)"
        if isinstance(point, str):
            raise UserError(f"site {name!r} is not available on the {self.model_type!r} family: {point}")
        return point


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
            sites=_sites(BlockParts("attn", "mlp", None), parallel=True),
        ),
        Family(
            "gpt_neox",
            "gpt_neox.layers",
            "gpt_neox.final_layer_norm",
            "gpt_neox.embed_in",
            ("lm_head", "embed_out"),  # embed_out before transformers 5
            BlockParts(attention="attention", mlp="mlp", mlp_norm="post_attention_layernorm"),
            sites=_sites(
                BlockParts(attention="attention", mlp="mlp", mlp_norm="post_attention_layernorm"),
                parallel="use_parallel_residual",
            ),
        ),
        Family(
            "opt",
            "model.decoder.layers",
            "model.decoder.final_layer_norm",
            "model.decoder.embed_tokens",
            "lm_head",
            BlockParts(attention="self_attn", mlp=None, mlp_norm="final_layer_norm"),
            sites=_sites(BlockParts(attention="self_attn", mlp=None, mlp_norm="final_layer_norm"), flat_mlp=True),
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
    from torch import nn

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
    yield from _site_problems(blocks, family)


def _site_problems(blocks: nn.ModuleList, family: Family) -> Iterator[str]:
    for site, point in family.sites.items():  # the sites' modules (a refused site names none)
        if site not in SITES:
            yield f"its table names an unknown site {site!r}"
        elif isinstance(point, SitePoint) and any(module_at(block, point.path) is None for block in blocks):
            yield f"a block has no module at {point.path} for site {site}"


def _width(module: nn.Module) -> int:
    from torch import nn

    return module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
