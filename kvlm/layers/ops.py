"""`keras.ops` replacements where a backend's own op cannot be exported and served."""

from __future__ import annotations

import keras
from keras import ops


def top_k(x, k):
    """`(values, indices)` of the `k` largest entries along the last axis, largest first
    (int32 indices).

    `keras.ops.top_k`, except on JAX: `jax.lax.top_k` lowers to a StableHLO composite that
    TensorFlow 2.20's `XlaCallModule` (the kernel TF Serving 2.20 links) cannot read, so a
    model exported from JAX would not load. There a stable sort gives the same result, and
    `k` may be a symbolic dimension (an unknown batch traced by `jax.export`).
    """
    if keras.backend.backend() != "jax":
        values, indices = ops.top_k(x, k)
        return values, ops.cast(indices, "int32")
    indices = ops.cast(ops.argsort(-x, axis=-1)[..., :k], "int32")
    return ops.take_along_axis(x, indices, axis=-1), indices
