"""kvlm.layers.ops against numpy on every backend."""

import keras
import numpy as np

from kvlm.layers.ops import top_k


def test_top_k_matches_a_full_sort():
    scores = np.random.default_rng(0).normal(size=(4, 50)).astype("float32")
    values, ids = top_k(keras.ops.convert_to_tensor(scores), 5)
    expected = np.argsort(-scores, axis=1)[:, :5]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ids), expected)
    assert keras.ops.convert_to_numpy(ids).dtype == np.int32
    np.testing.assert_allclose(keras.ops.convert_to_numpy(values), np.take_along_axis(scores, expected, 1))
