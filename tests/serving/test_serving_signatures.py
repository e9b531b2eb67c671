"""Which signatures of a SavedModel the embedded server serves, and how it runs them."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from kvlm.serving.models import LoadedVersion

pytestmark = pytest.mark.tensorflow_only


class _Model(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def dense(self, x):
        return {"y": x * 2.0}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def sparse(self, x):
        return {"nonzero": tf.sparse.from_dense(x)}


def test_sparse_signatures_are_skipped_with_a_log_line_and_dense_ones_served(tmp_path, caplog):
    module = _Model()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.dense, "sparse": module.sparse})
    with caplog.at_level(logging.WARNING, logger="kvlm.serving.models"):
        loaded = LoadedVersion("m", 1, tmp_path / "1")
    try:
        assert set(loaded.signature_defs) == {"serving_default", "sparse"}  # GetModelMetadata lists both
        assert set(loaded.signatures) == {"serving_default"}
        assert "signature 'sparse' has sparse or composite tensors" in caplog.text
        outputs = loaded.signature("serving_default").run({"x": np.array([1.0, 2.5], np.float32)})
        np.testing.assert_allclose(outputs["y"], [2.0, 5.0])
    finally:
        loaded.close()
