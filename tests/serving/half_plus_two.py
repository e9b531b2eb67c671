"""TF Serving's test model `half_plus_two` (y = 0.5 * x + 2), generated at test time.

`write_tf1` follows tensorflow_serving/servables/tensorflow/testdata/saved_model_half_plus_two.py:
a TF1 graph whose `serving_default` maps `x` (float `[None, 1]`) to `y`, with
`regress_x_to_y`, `regress_x_to_y2` (y2 = 0.5 * x + 3) and `classify_x_to_y`
signatures on serialized `tf.Example`s (feature `x`). `write_tf2` is the same
Predict signature written by `tf.saved_model.save` (`x` float `[None]`).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

VERSION_FOLDER = "00000123"


def write_tf1(export_dir: str | Path) -> Path:
    v1 = tf.compat.v1
    signature = v1.saved_model.signature_def_utils.build_signature_def
    info = v1.saved_model.utils.build_tensor_info
    constants = v1.saved_model.signature_constants
    with tf.Graph().as_default(), v1.Session() as session:
        a, b, c = v1.Variable(0.5, name="a"), v1.Variable(2.0, name="b"), v1.Variable(3.0, name="c")
        serialized = v1.placeholder(tf.string, name="tf_example", shape=[None])
        features = v1.io.parse_example(serialized, {
            "x": v1.io.FixedLenFeature([1], tf.float32),
            "x2": v1.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        })
        x = tf.identity(features["x"], name="x")
        y = tf.identity(a * x + b, name="y")
        y2 = tf.identity(a * x + c, name="y2")

        def regression(output):
            return signature({constants.REGRESS_INPUTS: info(serialized)}, {constants.REGRESS_OUTPUTS: info(output)},
                             constants.REGRESS_METHOD_NAME)

        signatures = {
            "serving_default": signature({"x": info(x)}, {"y": info(y)}, constants.PREDICT_METHOD_NAME),
            "regress_x_to_y": regression(y),
            "regress_x_to_y2": regression(y2),
            "classify_x_to_y": signature(
                {constants.CLASSIFY_INPUTS: info(serialized)}, {constants.CLASSIFY_OUTPUT_SCORES: info(y)},
                constants.CLASSIFY_METHOD_NAME,
            ),
        }
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.builder.SavedModelBuilder(str(export_dir))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
        builder.save()
    return Path(export_dir)


class _HalfPlusTwo(tf.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = tf.Variable(0.5), tf.Variable(2.0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x):
        return {"y": self.a * x + self.b}


def write_tf2(export_dir: str | Path) -> Path:
    module = _HalfPlusTwo()
    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.serve})
    return Path(export_dir)
