"""One module per experiment; each turns examples into patched runs and rows."""

from __future__ import annotations

import importlib

from patchscan.errors import UserError

EXPERIMENTS = {
    "next_token": "patchscan.experiments.next_token:NextTokenExperiment",
    "attribute_extraction": "patchscan.experiments.attributes:AttributeExperiment",
    "entity_resolution": "patchscan.experiments.entities:EntityExperiment",
    "cross_model": "patchscan.experiments.cross_model:CrossModelExperiment",
    "multihop": "patchscan.experiments.multihop:MultihopExperiment",
    "superscopes": "patchscan.experiments.superscopes:SuperscopesExperiment",
}


def get_experiment(name: str):
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    module, _, cls = EXPERIMENTS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
