"""Creating a compiled model's training state before `fit` traces its step."""

from __future__ import annotations

from typing import Any

import keras


def build_before_tracing(model: keras.Model, batch: Any) -> None:
    """Creates the variables of `model`'s layers, optimizer, compiled loss and metrics.

    Keras creates them symbolically before `fit` / `evaluate` only under a `tf.distribute`
    strategy. Without one it creates them inside the first trace of the TensorFlow train step,
    and TensorFlow, seeing variables made in a trace, traces the whole step a second time: the
    first `fit` of the tiny VLM takes 22 s instead of 8 s. Calling this after `compile` does the
    same symbolic build Keras does under a strategy (no data is computed) and changes nothing
    where that build has run already.

    Args:
        model: A compiled model.
        batch: One batch `(x, y[, sample_weight])` or its structure of `tf.TensorSpec`s /
            tensors (a dataset's `element_spec`), with any batch size.
    """
    model._symbolic_build(data_batch=batch)  # builds the optimizer too
