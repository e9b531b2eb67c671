"""kvlm: Keras 3 vision-language models with plugin-provided sparse Mixture-of-Experts."""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

from kvlm.lazy import lazy_getattr

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


_lazy_attribute = lazy_getattr(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    """Imports heavy subpackages on first use so `import kvlm` stays cheap."""
    if name in _SUBMODULES:
        return importlib.import_module(f"kvlm.{name}")
    return _lazy_attribute(name)
