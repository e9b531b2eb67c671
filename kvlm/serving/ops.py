"""Registers tensorflow-text's kernels, as the TF Serving binary links them.

`import tensorflow_text` also imports Keras (its `tensorflow_text.keras` layers touch
`tf.keras`), which a server does not need. Loading the op libraries that the
package ships (`tensorflow_text/python/*/_*.so`) registers the same ops (tokenizers,
regex split, normalization) without any Python layer on top.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import tensorflow as tf

logger = logging.getLogger(__name__)
_loaded: list[str] | None = None


def load_tf_text_ops() -> list[str]:
    """Loads every tensorflow-text op library once; returns their file names."""
    global _loaded
    if _loaded is not None:
        return _loaded
    spec = importlib.util.find_spec("tensorflow_text")
    if spec is None or not spec.submodule_search_locations:
        logger.warning("tensorflow-text is not installed: models using its ops (tokenizers) will not load.")
        _loaded = []
        return _loaded
    root = Path(next(iter(spec.submodule_search_locations)))
    names = []
    for library in sorted((root / "python").glob("*/_*.so")):
        tf.load_op_library(str(library))
        names.append(library.name)
    _loaded = names
    return names
