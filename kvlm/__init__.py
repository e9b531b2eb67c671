"""kvlm: Keras 3 vision-language models with plugin-provided sparse Mixture-of-Experts."""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

__version__ = "0.1.0"

# Marks a plugin's hook implementations; plugins use it instead of importing pluggy.
hookimpl = pluggy.HookimplMarker("kvlm")

_SUBMODULES = ("data", "experts", "export", "layers", "models", "serving", "testing", "training")
# Public names defined in submodules, imported on first use.
_LAZY = {
    "DatasetSpec": "kvlm.experts.spec",
    "ExpertSpec": "kvlm.experts.spec",
    "load_model": "kvlm.experts.saving",
}


def __getattr__(name: str) -> Any:
    """Imports heavy subpackages on first use so `import kvlm` stays cheap."""
    if name in _SUBMODULES:
        return importlib.import_module(f"kvlm.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvlm' has no attribute {name!r}")
