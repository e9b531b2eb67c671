"""The embedded server over real gRPC with the official stubs: Predict, GetModelMetadata,
GetModelStatus, and every bad request answered with the right status code."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

pytestmark = [pytest.mark.tensorflow_only, pytest.mark.long]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_MESSAGE_BYTES = 1024 * 1024  # the session server's limit (conftest.py)


def make_request(images, texts, model="kvlm", signature="serving_default", version=None, label=None):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=signature))
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if images is not None:
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    if texts is not None:
        request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    return request


def test_predict_answers_a_batch(stub, examples, exported):
    from kvlm.runs import load_run

    images, texts = examples
    response = stub.Predict(make_request(images[:3], texts[:3]), timeout=60)
    assert response.model_spec.name == "kvlm" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    answers = load_run(exported[0]).answers
    assert outputs["scores"].shape == (3, len(answers))
    np.testing.assert_allclose(outputs["scores"].sum(-1), 1.0, rtol=1e-5)
    assert [a.decode() for a in outputs["answer"]] == [answers[i] for i in outputs["scores"].argmax(-1)]
    assert outputs["labels"].shape == (3, len(answers))
    # The same request with a version label, and with an output filter.
    by_label = stub.Predict(make_request(images[:1], texts[:1], label="stable"), timeout=60)
    assert by_label.model_spec.version.value == 1
    request = make_request(images[:1], texts[:1])
    request.output_filter.append("answer")
    assert set(stub.Predict(request, timeout=60).outputs) == {"answer"}


def test_predict_raw_features_signature(client):
    outputs = client.predict(
        "kvlm",
        {"images": np.zeros((2, 32, 32, 3), np.float32), "token_ids": np.ones((2, 16), np.int32)},
        signature_name="logits",
    )
    assert list(outputs) == ["output_0"] and outputs["output_0"].shape[0] == 2


def test_client_reads_metadata_and_answers(client, examples):
    signatures = client.metadata("kvlm")
    assert set(signatures) == {"serving_default", "logits"}
    serving = signatures["serving_default"]
    assert serving["inputs"] == {"image_bytes": ("string", [-1]), "text": ("string", [-1])}
    assert set(serving["outputs"]) == {"answer", "score", "scores", "labels"}
    images, texts = examples
    result = client.ask("kvlm", images[:2], texts[:2])
    assert result["answer"].shape == (2,) and result["scores"].shape[0] == 2


def test_model_status(target):
    channel = grpc.insecure_channel(target)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    response = stub.GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="kvlm")), timeout=30
    )
    [status] = response.model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    for spec, code in [
        (model_pb2.ModelSpec(name="nope"), NOT_FOUND),
        (model_pb2.ModelSpec(name="../kvlm"), INVALID),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=spec), timeout=30)
        assert error.value.code() == code
    spec = model_pb2.ModelSpec(name="kvlm")
    spec.version.value = 42
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=spec), timeout=30)
    assert error.value.code() == NOT_FOUND and "42" in error.value.details()
    channel.close()


def test_metadata_errors(stub):
    for name, fields, code, message in [
        ("kvlm", ["signature_def", "other"], INVALID, "metadata_field"),
        ("nope", ["signature_def"], NOT_FOUND, "not served"),
        ("/etc/passwd", ["signature_def"], INVALID, "not a path"),
    ]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_pb2.ModelSpec(name=name), metadata_field=fields
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelMetadata(request, timeout=30)
        assert error.value.code() == code and message in error.value.details()


def _bad_requests(images, texts):
    png = images[0]
    good = (lambda: make_request([png], [texts[0]]))

    def with_input(name, proto):
        request = good()
        request.inputs[name].CopyFrom(proto)
        return request

    def without(name):
        request = good()
        del request.inputs[name]
        return request

    def filtered():
        request = good()
        request.output_filter.append("logits")
        return request

    miscounted = tf.make_tensor_proto([png], dtype=tf.string)
    miscounted.tensor_shape.dim[0].size = 3
    return {
        "empty image": (make_request([b""], ["q"]), INVALID, "Input is empty"),
        "corrupt image": (make_request([b"\x00garbage bytes"], ["q"]), INVALID, "Unknown image file format"),
        "truncated png": (make_request([png[:60]], ["q"]), INVALID, "decode_image"),
        "wrong dtype": (with_input("image_bytes", tf.make_tensor_proto([1.0])), INVALID, "must be DT_STRING, got DT_FLOAT"),
        "wrong rank": (with_input("text", tf.make_tensor_proto([[b"q"]])), INVALID, "must have rank 1"),
        "scalar input": (with_input("text", tf.make_tensor_proto(b"q")), INVALID, "must have rank 1"),
        "missing input": (without("text"), INVALID, "Missing input(s) ['text']"),
        "extra input": (with_input("extra", tf.make_tensor_proto([b"x"])), INVALID, "Unexpected input(s) ['extra']"),
        "batch mismatch": (make_request([png, png], ["q"]), INVALID, "same batch size"),
        "empty batch": (make_request(np.array([], dtype=object), np.array([], dtype=object)), INVALID, "empty"),
        "value count": (with_input("image_bytes", miscounted), INVALID, "1 values for shape [3]"),
        "unknown output": (filtered(), INVALID, "Unknown output(s) ['logits']"),
        "unknown model": (make_request([png], ["q"], model="nope"), NOT_FOUND, "not served"),
        "empty model name": (make_request([png], ["q"], model=""), INVALID, "name is empty"),
        "escaping name": (make_request([png], ["q"], model="../kvlm"), INVALID, "not a path"),
        "absolute name": (make_request([png], ["q"], model="/tmp/kvlm"), INVALID, "not a path"),
        "unknown version": (make_request([png], ["q"], version=7), NOT_FOUND, "version 7 is not available"),
        "unknown label": (make_request([png], ["q"], label="canary"), NOT_FOUND, "no version label 'canary'"),
        "unknown signature": (make_request([png], ["q"], signature="nope"), NOT_FOUND, "no signature 'nope'"),
        "oversized message": (
            make_request([png + bytes(MAX_MESSAGE_BYTES)], ["q"]), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max",
        ),
    }


CASES = [
    "empty image", "corrupt image", "truncated png", "wrong dtype", "wrong rank", "scalar input", "missing input",
    "extra input", "batch mismatch", "empty batch", "value count", "unknown output", "unknown model",
    "empty model name", "escaping name", "absolute name", "unknown version", "unknown label", "unknown signature",
    "oversized message",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_request_fails_cleanly_and_server_keeps_serving(stub, examples, case):
    images, texts = examples
    request, code, message = _bad_requests(images, texts)[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=60)
    assert error.value.code() == code, error.value.details()
    assert message in error.value.details()
    response = stub.Predict(make_request(images[:1], texts[:1]), timeout=60)
    assert tf.make_ndarray(response.outputs["answer"]).shape == (1,)
