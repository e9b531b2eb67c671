"""kvlm's own export over the REST API with a plain HTTP client: raw image bytes as
`{"b64": ...}`, row and columnar formats with the answers gRPC gives, and bad requests
answered with HTTP 400 naming the problem."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from hostile import huge_png
from rest_client import rest

pytestmark = pytest.mark.tensorflow_only

PREDICT = "/v1/models/kvlm:predict"


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def grpc_outputs(stub, images, texts) -> dict:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "kvlm"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    return {k: tf.make_ndarray(v) for k, v in stub.Predict(request, timeout=60).outputs.items()}


def assert_same_answers(columns: dict, expected: dict) -> None:
    assert columns["answer"] == [a.decode() for a in expected["answer"]]
    assert columns["labels"] == [[label.decode() for label in row] for row in expected["labels"]]
    np.testing.assert_allclose(columns["score"], expected["score"], rtol=1e-6)
    np.testing.assert_allclose(columns["scores"], expected["scores"], rtol=1e-6)


def test_row_format_with_b64_images_answers_as_grpc(server, stub, examples):
    images, texts = examples
    body = {"instances": [{"image_bytes": b64(i), "text": t} for i, t in zip(images[:3], texts[:3])]}
    status, answer = rest(server, PREDICT, body)
    assert status == 200, answer
    predictions = answer["predictions"]
    assert len(predictions) == 3 and all(set(p) == {"answer", "score", "scores", "labels"} for p in predictions)
    columns = {name: [p[name] for p in predictions] for name in predictions[0]}
    assert_same_answers(columns, grpc_outputs(stub, images[:3], texts[:3]))


def test_columnar_format_by_version_label_answers_as_grpc(server, stub, examples):
    images, texts = examples
    body = {"signature_name": "serving_default",
            "inputs": {"image_bytes": [b64(i) for i in images[3:5]], "text": texts[3:5]}}
    status, answer = rest(server, "/v1/models/kvlm/labels/stable:predict", body)
    assert status == 200, answer
    assert_same_answers(answer["outputs"], grpc_outputs(stub, images[3:5], texts[3:5]))


def _bad_bodies(png: bytes) -> dict:
    return {
        "batch mismatch": ({"inputs": {"image_bytes": [b64(png), b64(png)], "text": ["q"]}}, "same batch size"),
        "wrong rank": ({"inputs": {"image_bytes": [b64(png)], "text": [["q"]]}}, "must have rank 1"),
        "unknown input": ({"instances": [{"image": b64(png), "text": "q"}]}, "the signature takes"),
        "bad base64": ({"instances": [{"image_bytes": {"b64": "*not base64*"}, "text": "q"}]}, "base64"),
        "corrupt image": ({"instances": [{"image_bytes": b64(b"\x00garbage bytes"), "text": "q"}]},
                          "Unknown image file format"),
        "huge image": ({"instances": [{"image_bytes": b64(huge_png()), "text": "q"}]}, "above the server's limit"),
    }


@pytest.mark.parametrize("case", ["batch mismatch", "wrong rank", "unknown input", "bad base64", "corrupt image",
                                  "huge image"])
def test_bad_request_is_a_400_naming_the_problem_and_the_server_keeps_serving(server, examples, case):
    images, texts = examples
    body, message = _bad_bodies(images[0])[case]
    status, answer = rest(server, PREDICT, body)
    assert status == 400
    assert list(answer) == ["error"] and message in answer["error"], answer
    status, answer = rest(server, PREDICT, {"instances": [{"image_bytes": b64(images[0]), "text": texts[0]}]})
    assert status == 200 and len(answer["predictions"]) == 1
