"""patchscan: Patchscopes from a notebook, and experiments from Hydra configs.

>>> import patchscan as ps
>>> lm = ps.load_model("tiny_llama", device="cpu")  # "smollm2_135m": the built-in pretrained model
>>> src = ps.capture(lm, "The Eiffel Tower is located in the city of", layers=[1, 2], positions=[-1])
>>> target = ps.TargetPrompt(lm, "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?", placeholder="?")
>>> len(ps.next_token(lm, [target.patch(src.at(layer=2), layer=2)]).to_frame())
1

The flow of an experiment is one way: dataset -> experiment (work items) -> runner (batches) -> engine
(patched runs) -> rows -> Parquet -> metrics and plots. The names below load lazily, so
`import patchscan` costs little and loads neither Hydra, pandas nor matplotlib.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "patchscan.models.loading",
    "ModelView": "patchscan.models.view",
    "capture": "patchscan.api.states",
    "State": "patchscan.api.states",
    "States": "patchscan.api.states",
    "TargetPrompt": "patchscan.api.targets",
    "Patch": "patchscan.api.targets",
    "next_token": "patchscan.api.readouts",
    "generate": "patchscan.api.readouts",
    "NextTokenResult": "patchscan.api.results",
    "GenerationResult": "patchscan.api.results",
    "LogitLens": "patchscan.api.lenses",
    "AffineLens": "patchscan.api.lenses",
    "AffineMaps": "patchscan.api.lenses",
    "overwrite": "patchscan.api.intervene",
    "edit_blocks": "patchscan.api.intervene",
    "UserError": "patchscan.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    for package in ("patchscan.api", "patchscan"):  # a module: ps.readouts, ps.lenses (the API's), ps.grids
        if name.isidentifier() and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module 'patchscan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
