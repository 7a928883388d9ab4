"""One module per experiment; each turns examples into patched runs and rows."""

from __future__ import annotations

import importlib

from patchscan.errors import UserError

SCOPES = {
    "next_token": "patchscan.scopes.next_token:NextTokenScope",
    "attribute_extraction": "patchscan.scopes.attributes:AttributeScope",
    "entity_resolution": "patchscan.scopes.entities:EntityScope",
    "cross_model": "patchscan.scopes.cross_model:CrossModelScope",
    "multihop": "patchscan.scopes.multihop:MultihopScope",
}


def get_scope(name: str):
    if name not in SCOPES:
        raise UserError(f"unknown experiment {name!r}; choose from {', '.join(SCOPES)}")
    module, _, cls = SCOPES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
