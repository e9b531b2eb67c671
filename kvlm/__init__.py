"""kvlm: Keras 3 vision-language models with plugin-provided sparse Mixture-of-Experts."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "layers", "models", "training")


def __getattr__(name: str) -> Any:
    """Imports heavy subpackages on first use so `import kvlm` stays cheap."""
    if name in _SUBMODULES:
        return importlib.import_module(f"kvlm.{name}")
    raise AttributeError(f"module 'kvlm' has no attribute {name!r}")
