"""The expert plugin contract: specs, hooks, discovery and loading.

Plugins declare an entry point in the group "kvlm" whose module implements
`kvlm_register_experts()` (and optionally `kvlm_register_datasets()`) marked with
`kvlm.hookimpl`. See docs/plugins.md.
"""

from __future__ import annotations

from typing import Any

from kvlm.experts.manager import (
    ALLOW_ENV,
    DENY_ENV,
    ENTRY_POINT_GROUP,
    FIRST_PARTY_EXPERTS,
    DatasetInfo,
    ExpertInfo,
    ExpertNotFoundError,
    PluginReport,
    Registry,
    available,
    broken,
    build_expert,
    datasets,
    discover,
    distribution_for,
    get_plugin_manager,
    load_model,
    refresh,
    registry,
)
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
    "FFNExpert",
    "PluginReport",
    "Registry",
    "available",
    "broken",
    "build_expert",
    "datasets",
    "discover",
    "distribution_for",
    "get_plugin_manager",
    "load_model",
    "refresh",
    "registry",
]


def __getattr__(name: str) -> Any:
    """`FFNExpert` imports keras, so it is loaded on first use."""
    if name == "FFNExpert":
        from kvlm.experts.builtin import FFNExpert

        return FFNExpert
    raise AttributeError(f"module 'kvlm.experts' has no attribute {name!r}")
