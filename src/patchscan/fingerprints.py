"""Cache keys by content: a loaded model's fingerprint and the key of a set of fitted maps.

A fitted map depends on the weights (not on the config's name: `model.seed=1`, a local folder or
a GGUF under a default name, a hub revision all change them), the dtype, the token ids it was
fitted on, the blocks and positions, the ridge and the fitting code. `map_cache_key` hashes all of
them, so a cache can never hand one model's maps to another.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FIT_VERSION = 2  # bump when the fitting code changes what it produces
_SAMPLE = 4096  # values read per tensor for the fingerprint


def model_fingerprint(view) -> str:
    """A hash of the loaded model's architecture config and its weights (a strided sample of every
    tensor, with names, shapes and dtypes), computed once per ModelView. Parameters offloaded to the
    meta device count by name and shape only."""
    cached = view.__dict__.get("_patchscan_fingerprint")
    if cached:
        return cached
    import torch

    model = view.model
    h = hashlib.sha256(type(model).__name__.encode())
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            h.update(flat[::step][:_SAMPLE].to("cpu", torch.float32).numpy().tobytes())
    view.__dict__["_patchscan_fingerprint"] = h.hexdigest()[:20]
    return view.__dict__["_patchscan_fingerprint"]


def map_cache_key(*parts: Any) -> str:
    """A short hash of everything a set of fitted maps depends on (plus FIT_VERSION)."""
    blob = json.dumps([FIT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
