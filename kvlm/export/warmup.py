"""Warm-up requests in TF Serving's format: `assets.extra/tf_serving_warmup_requests`.

The file is a TFRecord of `tensorflow.serving.PredictionLog` protos. TF Serving (and
kvlm's embedded server) replays them when a version loads, before it is marked
AVAILABLE, so the first real request does not pay for graph initialization.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from kvlm.export.signatures import IMAGE_INPUT, SIGNATURE_NAME, TEXT_INPUT

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_QUESTION = "what color is the shape?"


def example_png(image_size: int, seed: int = 0) -> bytes:
    """A small random RGB PNG of `image_size` x `image_size` pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


def make_predict_request(
    model_name: str, images: Sequence[bytes], texts: Sequence[str], signature_name: str = SIGNATURE_NAME
) -> predict_pb2.PredictRequest:
    """A `PredictRequest` for the `serving_default` signature."""
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
    )
    request.inputs[IMAGE_INPUT].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    request.inputs[TEXT_INPUT].CopyFrom(tf.make_tensor_proto(list(texts), dtype=tf.string))
    return request


def write_warmup_requests(
    version_dir: str | Path,
    model_name: str,
    image_size: int,
    batch_sizes: Sequence[int] = (1, 8),
    with_text: bool = True,
) -> Path:
    """Writes one warm-up `PredictionLog` per batch size; returns the file path.

    `with_text=False` leaves out the `text` input, for image-only signatures.
    """
    path = Path(version_dir) / WARMUP_DIR / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for size in batch_sizes:
            request = make_predict_request(
                model_name, [example_png(image_size, seed=i) for i in range(size)], [WARMUP_QUESTION] * size
            )
            if not with_text:
                del request.inputs[TEXT_INPUT]
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path

