"""The expert plugin contract: specs, hooks, discovery, building and loading.

Plugins declare an entry point in the group "kvlm" whose module implements
`kvlm_register_experts()` (and optionally `kvlm_register_datasets()`) marked with
`kvlm.hookimpl`. The plugin kit: `Reference` (lazy `"module:attr"` builders),
`kvlm.experts.layer.ExpertLayer` (the base expert layer) and
`kvlm.experts.procedural.ProceduralDataset`. See docs/plugins.md.
"""

from __future__ import annotations

from kvlm.experts.discovery import (
    ALLOW_ENV,
    DENY_ENV,
    ENTRY_POINT_GROUP,
    FIRST_PARTY_EXPERTS,
    DatasetInfo,
    ExpertInfo,
    PluginReport,
    Registry,
    available,
    broken,
    datasets,
    discover,
    distribution_for,
    get_plugin_manager,
    refresh,
    registry,
)
from kvlm.experts.factory import build_expert, find_expert
from kvlm.experts.messages import ExpertNotFoundError
from kvlm.experts.reference import Reference
from kvlm.experts.saving import load_model
from kvlm.experts.spec import DatasetSpec, ExpertSpec

__all__ = [
    "ALLOW_ENV",
    "DENY_ENV",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_EXPERTS",
    "DatasetInfo",
    "DatasetSpec",
    "ExpertInfo",
    "ExpertNotFoundError",
    "ExpertSpec",
    "PluginReport",
    "Reference",
    "Registry",
    "available",
    "broken",
    "build_expert",
    "datasets",
    "discover",
    "distribution_for",
    "find_expert",
    "get_plugin_manager",
    "load_model",
    "refresh",
    "registry",
]
