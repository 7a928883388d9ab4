"""A uniform view of a decoder-only Hugging Face model: blocks, final norm, unembedding.

Where each module is comes from the family table (models.families, one row per model_type),
checked when the view is made; nothing here knows an architecture by name.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from patchscan import grids
from patchscan.errors import UserError
from patchscan.models.families import Family, check, module_at

# Module attributes holding forward hooks: set aside while the block output is probed, shared by
# the stand-ins of skipped blocks (engine.hooks).
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def execution_device(module: nn.Module) -> torch.device | None:
    """Where a module computes: accelerate's execution device for a dispatched (maybe offloaded)
    module, whose weights may sit on the meta device, else the device of its first weight (None
    for a module without weights)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


def _model_name(model: nn.Module) -> str:
    """A short name for a wrapped model: its hub id or folder name, else its class name."""
    path = str(getattr(model.config, "_name_or_path", "") or "")
    return path.rstrip("/").split("/")[-1] or type(model).__name__


@dataclass
class ModelView:
    """What patching needs of a model, found once: its family's row, blocks, final norm, unembedding."""

    model: nn.Module
    tokenizer: object
    name: str = "model"
    family: Family = field(init=False)
    blocks: nn.ModuleList = field(init=False)
    final_norm: nn.Module | None = field(init=False)
    unembed: nn.Module = field(init=False)
    attention_windows: list[int | None] = field(init=False)

    def __post_init__(self) -> None:
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.family = check(self.model, self.name)
        self.blocks = module_at(self.model, self.family.blocks)
        self.final_norm = module_at(self.model, self.family.final_norm) if self.family.final_norm else None
        self.unembed = module_at(self.model, self.family.unembedding)
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.attention_windows = self._attention_windows()

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer, name: str | None = None) -> ModelView:
        """View a Hugging Face model you already hold, without reloading or changing it.

        >>> import patchscan as ps
        >>> tiny = ps.load_model("tiny_llama")  # stands in for a model you loaded yourself
        >>> hf_model, tokenizer = tiny.model, tiny.tokenizer
        >>> lm = ps.ModelView.wrap(hf_model, tokenizer)
        >>> lm.n_blocks, lm.model is hf_model
        (4, True)

        No forward pass runs here and nothing of the model or tokenizer is modified (no eval mode,
        no padding token): the first patched run probes what the blocks return. Call
        `hf_model.eval()` yourself if it is in training mode (dropout would change every result).
        """
        if getattr(model, "training", False):
            import logging

            logging.getLogger(__name__).warning("the wrapped model is in training mode: call model.eval() first")
        return cls(model=model, tokenizer=tokenizer, name=name or _model_name(model))

    @property
    def block_returns_tuple(self) -> bool:
        """Whether a decoder block returns a tuple (else a bare tensor): probed by one tiny forward on
        first use, not when the view is made."""
        if "_block_returns_tuple" not in self.__dict__:
            self.__dict__["_block_returns_tuple"] = self._probe_block_output()
        return self.__dict__["_block_returns_tuple"]

    def site(self, name: str):
        """Where site `name` is inside each block (models.families.SitePoint), None for the block's
        output (resid_post); a site the family or this model's config lacks is refused in one line."""
        return self.family.site(name, self.model.config.get_text_config())

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.unembed.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding: the width of every logits row (262,144 for Gemma 3)."""
        return self.unembed.weight.shape[0]

    @property
    def embed(self) -> nn.Module:
        """The model's own input embedding, including any scaling it applies (Gemma multiplies by
        sqrt(width) inside it): what block 0 receives. Use it, never `unembed.weight`, for inputs."""
        return self.model.get_input_embeddings()

    @property
    def tied_embeddings(self) -> bool:
        """Whether the unembedding shares its weight with the input embedding."""
        return self.unembed.weight is getattr(self.embed, "weight", None)

    @property
    def device(self) -> torch.device:
        """The output device: where the unembedding computes, so where logits come from."""
        return execution_device(self.unembed)

    @property
    def input_device(self) -> torch.device:
        """Where input ids and prefix KV caches go: the device of the input embedding.

        It differs from `device` only for models split over devices (`model.device_map`).
        """
        return execution_device(self.model.get_input_embeddings())

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    def check_layer(self, layer: int, what: str = "layer") -> int:
        """Resolve one (possibly negative) block index by the one block grammar (`patchscan.grids`)."""
        return grids.block(layer, self.n_blocks, what, self.name)

    def check_state(self, value, what: str = "vector", dims: tuple[int, ...] = (1,)) -> torch.Tensor:
        """`value` as a tensor of states of this model: `dims` dimensions (1: one state), the last of
        width `width`. The one check every entry point taking a vector uses (patches, overwrite,
        lenses), so a wrong shape is one line, not a broadcast or a traceback deep in a forward."""
        vector = getattr(value, "vector", value)  # a State gives its vector
        if not isinstance(vector, torch.Tensor):
            raise UserError(f"the {what} must be a State or a tensor, not {type(value).__name__}")
        shape = tuple(vector.shape)
        if vector.dim() in dims and shape[-1:] != (self.width,):
            raise UserError(
                f"the {what} has width {shape[-1] if shape else 0} (shape {shape}), but {self.name}'s states "
                f"have width {self.width}"
            )
        if vector.dim() not in dims or not vector.is_floating_point():
            wanted = " or ".join({1: "(width,)", 2: "(rows, width)"}.get(d, f"(..., width) of {d} dims") for d in dims)
            raise UserError(
                f"the {what} has shape {shape} ({vector.dtype}); {self.name}'s states here are floating tensors "
                f"of shape {wanted.replace('width', str(self.width))}"
            )
        return vector

    def check_token_ids(self, ids, what: str = "token ids") -> tuple[int, ...]:
        """Token ids as ints, each a row of the embedding (0 <= id < vocab_size), at least one."""
        try:
            out = tuple(int(t) for t in ids)
        except (TypeError, ValueError):
            raise UserError(f"the {what} must be a sequence of whole numbers, not {ids!r:.80}") from None
        rows = int(getattr(self.embed, "num_embeddings", self.vocab_size))
        bad = [t for t in out if not 0 <= t < rows]
        if not out or bad:
            raise UserError(
                f"the {what} {'are empty' if not out else f'hold {bad[0]}'}: {self.name}'s token ids are 0..{rows - 1}"
            )
        return out

    @torch.no_grad()
    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of block outputs read through the final norm and unembedding (the logit lens)."""
        hidden = hidden.to(dtype=self.dtype)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden.to(execution_device(self.final_norm) or hidden.device))
        logits = self.unembed(hidden.to(self.device)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _attention_windows(self) -> list[int | None]:
        """Per block, the sliding window its KV cache keeps (None: all tokens), as transformers'
        DynamicCache builds it from the config (Gemma 3: five sliding blocks, then one global)."""
        from transformers import DynamicCache

        layers = DynamicCache(config=self.model.config).layers
        windows = [getattr(layer, "sliding_window", None) for layer in layers]
        return windows if len(windows) == self.n_blocks else [None] * self.n_blocks

    def kv_tokens(self, seq_len: int) -> int:
        """Tokens held in the KV caches of all blocks for a sequence of `seq_len` tokens."""
        return sum(seq_len if w is None else min(seq_len, w) for w in self.attention_windows)

    @torch.no_grad()
    def _probe_block_output(self) -> bool:
        """Blocks return a tensor or a tuple depending on model and transformers version: look once.

        The blocks' own hooks are set aside meanwhile, since the first use may come while patch
        hooks are registered."""
        seen: list[bool] = []
        saved = [{name: getattr(block, name) for name in HOOK_DICTS} for block in self.blocks]
        for block in self.blocks:
            for name in HOOK_DICTS:
                setattr(block, name, OrderedDict())
        handle = self.blocks[0].register_forward_hook(lambda m, i, o: seen.append(isinstance(o, tuple)))
        try:
            self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.input_device), use_cache=False)
        finally:
            handle.remove()
            for block, hooks in zip(self.blocks, saved):
                for name, value in hooks.items():
                    setattr(block, name, value)
        return seen[0]

    def encode(self, text: str) -> list[int]:
        """Token ids of a text as the model sees it (with a BOS token where the tokenizer adds one)."""
        return list(self.tokenizer(text).input_ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
