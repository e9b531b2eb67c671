"""Building a compiled model's training state before `fit` traces its train step."""

import keras
import numpy as np
import pytest

from kvlm.training.tracing import build_before_tracing


def _compiled_model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs)))
    model.compile(keras.optimizers.AdamW(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.mark.tensorflow_only
def test_fit_creates_no_variable_inside_its_trace():
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    traced = []

    def record(next_creator, **kwargs):
        if tf.inside_function():
            traced.append(kwargs.get("name"))
        return next_creator(**kwargs)

    unbuilt = _compiled_model()
    with tf.variable_creator_scope(record):
        unbuilt.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # Without a strategy Keras makes the optimizer's and metrics' variables in the trace.
    assert traced, "Keras no longer creates variables in the first trace: build_before_tracing can go"

    traced.clear()
    model = _compiled_model()
    build_before_tracing(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16).element_spec)
    assert model.optimizer.built and model.optimizer.variables
    with tf.variable_creator_scope(record):
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert traced == []
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_a_second_build_changes_nothing():
    x, y = np.zeros((8, 4), "float32"), np.zeros((8,), "int32")
    model = _compiled_model()
    build_before_tracing(model, (x, y))
    before = [v.path for v in model.optimizer.variables + model.metrics_variables]
    build_before_tracing(model, (x, y))
    assert [v.path for v in model.optimizer.variables + model.metrics_variables] == before
    assert model.evaluate(x, y, verbose=0, return_dict=True).keys() == {"loss", "accuracy"}
