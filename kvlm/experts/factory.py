"""Building a discovered expert by name, with the weights its plugin ships.

Keras is imported when an expert is built, so discovery alone stays cheap.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvlm.experts.discovery import ExpertInfo, registry
from kvlm.experts.messages import missing_expert
from kvlm.experts.spec import ExpertSpec

if TYPE_CHECKING:
    import keras


def find_expert(name: str, recorded: str | None = None) -> ExpertInfo:
    """The discovered expert `name`.

    Raises:
        ExpertNotFoundError: no discovered expert has that name; the message says which
            distribution to `pip install` (first-party, else `recorded`, the distribution
            a saved model recorded) and lists the available experts otherwise.
    """
    reg = registry()
    info = reg.experts.get(name)
    if info is None:
        raise missing_expert(name, reg, recorded)
    return info


def build_expert(name: str, d_model: int, **options) -> keras.layers.Layer:
    """Builds the discovered expert `name` as a Keras layer of width `d_model`.

    Raises:
        ExpertNotFoundError: see `find_expert`.
    """
    import keras

    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
        raise ValueError(f"`d_model` must be a positive integer. Received: d_model={d_model!r}")
    info = find_expert(name)
    layer = info.spec.build(d_model=d_model, **options)
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            f"Expert {name!r} from {info.distribution}: build() must return a keras.layers.Layer. "
            f"Received: {type(layer).__name__}"
        )
    if info.spec.weights:
        load_shipped_weights(layer, info, d_model)
    return layer


def ensure_built(layer: keras.layers.Layer, d_model: int) -> None:
    """Builds `layer` for `(tokens, d_model)` inputs with a symbolic call, which runs its
    `build()` or, for a layer without one, creates its sublayers' weights by tracing `call`
    (Keras marks such a layer built from a saved build config while it has no weights yet)."""
    import keras

    if not layer.built or not layer.weights:
        layer(keras.KerasTensor((None, d_model)))


def _module_folder(build) -> Path:
    name = getattr(build, "module", None) or getattr(build, "__module__", "") or ""
    module = sys.modules.get(name) or (importlib.import_module(name) if name else None)
    return Path(module.__file__).parent if getattr(module, "__file__", None) else Path.cwd()


def shipped_path(spec: ExpertSpec, path: str) -> Path:
    """`path` (the spec's `weights` or `trained`), relative paths against the module defining `build`."""
    path = Path(path)
    return path if path.is_absolute() else _module_folder(spec.build) / path


def load_shipped_weights(layer: keras.layers.Layer, info: ExpertInfo, d_model: int) -> None:
    """Loads `info.spec.weights` (relative to the module defining `build`) into `layer`."""
    import keras

    path = shipped_path(info.spec, info.spec.weights)
    ensure_built(layer, d_model)
    try:
        keras.saving.load_weights(layer, str(path))
    except Exception as error:
        raise ValueError(
            f"Could not load the weights shipped with expert {info.name!r} ({info.distribution}) "
            f"from {path}: {error}"
        ) from error
