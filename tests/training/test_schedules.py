"""The warm-up cosine schedule: Keras's CosineDecay values, without a traced conditional."""

import keras
import numpy as np
import pytest

from kvlm.training.schedules import WarmupCosineDecay

STEPS = [0, 1, 25, 49, 50, 51, 300, 1049, 1050, 1051, 5000]


def test_matches_keras_cosine_decay_with_warmup_and_round_trips():
    ours = WarmupCosineDecay(1e-4, 1000, warmup_target=2e-3, warmup_steps=50, alpha=0.1)
    keras_schedule = keras.optimizers.schedules.CosineDecay(1e-4, 1000, alpha=0.1, warmup_target=2e-3, warmup_steps=50)
    expected = [float(keras_schedule(s)) for s in STEPS]
    np.testing.assert_allclose([float(ours(s)) for s in STEPS], expected, rtol=1e-6)
    assert expected[0] == pytest.approx(1e-4) and expected[5] == pytest.approx(2e-3, rel=1e-4)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(ours))
    assert type(restored) is WarmupCosineDecay
    np.testing.assert_allclose([float(restored(s)) for s in STEPS], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="`warmup_steps` must be >= 1. Received: warmup_steps=0"):
        WarmupCosineDecay(0.0, 1000, warmup_target=2e-3, warmup_steps=0)


@pytest.mark.tensorflow_only
def test_traces_no_conditional():
    import tensorflow as tf

    schedule = WarmupCosineDecay(0.0, 1000, warmup_target=2e-3, warmup_steps=50)
    graph = tf.function(schedule).get_concrete_function(tf.TensorSpec([], tf.int64)).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "Select" in op_types or "SelectV2" in op_types
    assert not op_types & {"If", "StatelessIf"}, op_types
    keras_graph = tf.function(keras.optimizers.schedules.CosineDecay(0.0, 1000, warmup_target=2e-3, warmup_steps=50))
    keras_ops = {op.type for op in keras_graph.get_concrete_function(tf.TensorSpec([], tf.int64)).graph.get_operations()}
    assert keras_ops & {"If", "StatelessIf"}, "Keras's CosineDecay no longer traces a conditional: drop ours"
