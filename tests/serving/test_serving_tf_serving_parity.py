"""TF Serving's own test model (half_plus_two in version folder 00000123) answered as
tensorflow_model_server answers it: every PredictionService method over gRPC with the
official stubs, ModelService, and the REST API with a plain HTTP client. The expected
values and bodies are those of tensorflow_serving/model_servers/tensorflow_model_server_test.py."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from rest_client import rest

pytestmark = pytest.mark.tensorflow_only

TIMEOUT = 30


@pytest.fixture
def channel(hp_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{hp_server.port}")
    yield channel
    channel.close()


@pytest.fixture
def predictions(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture
def models(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(model: str, values, signature: str = ""):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(values, dtype=tf.float32))
    return request


def examples_request(request, model="half_plus_two", signature="", values=(2.0,)):
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for value in values:
        request.input.example_list.examples.add().features.feature["x"].float_list.value.append(value)
    return request


@pytest.mark.parametrize("model", ["half_plus_two", "half_plus_two_tf2"])
def test_predict_grpc_with_and_without_output_filter(predictions, model):
    for output_filter in (["y"], []):
        request = predict_request(model, [2.0])
        request.output_filter.extend(output_filter)
        result = predictions.Predict(request, TIMEOUT)
        assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
        assert tf.make_ndarray(result.outputs["y"]).tolist() == [3.0]
        assert (result.model_spec.name, result.model_spec.signature_name) == (model, "serving_default")
        assert result.model_spec.version.value == 123


def test_tf2_model_checks_shapes_tf1_graph_takes_what_its_ops_take(predictions):
    assert tf.make_ndarray(predictions.Predict(predict_request("half_plus_two", [[2.0], [4.0]]), TIMEOUT)
                           .outputs["y"]).tolist() == [[3.0], [4.0]]
    with pytest.raises(grpc.RpcError) as caught:
        predictions.Predict(predict_request("half_plus_two_tf2", [[2.0]]), TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank 1" in caught.value.details()


def test_classify_grpc(predictions):
    result = predictions.Classify(examples_request(classification_pb2.ClassificationRequest(),
                                                   signature="classify_x_to_y"), TIMEOUT)
    assert len(result.result.classifications) == 1
    assert [(c.label, c.score) for c in result.result.classifications[0].classes] == [("", 3.0)]
    assert (result.model_spec.name, result.model_spec.signature_name, result.model_spec.version.value) == (
        "half_plus_two", "classify_x_to_y", 123)


def test_regress_grpc_batch_and_context(predictions):
    request = examples_request(regression_pb2.RegressionRequest(), signature="regress_x_to_y", values=(2.0, 4.0, 6.0))
    result = predictions.Regress(request, TIMEOUT)
    assert [r.value for r in result.result.regressions] == [3.0, 4.0, 5.0]
    assert result.model_spec.signature_name == "regress_x_to_y" and result.model_spec.version.value == 123

    with_context = regression_pb2.RegressionRequest()
    with_context.model_spec.name = "half_plus_two"
    with_context.model_spec.signature_name = "regress_x_to_y2"
    listed = with_context.input.example_list_with_context
    listed.context.features.feature["x"].float_list.value.append(10.0)
    listed.examples.add()  # takes x from the context
    listed.examples.add().features.feature["x"].float_list.value.append(2.0)  # its own x wins
    assert [r.value for r in predictions.Regress(with_context, TIMEOUT).result.regressions] == [8.0, 4.0]


def test_multi_inference_grpc(predictions):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in (("regress_x_to_y", "tensorflow/serving/regress"),
                              ("classify_x_to_y", "tensorflow/serving/classify")):
        task = request.tasks.add(method_name=method)
        task.model_spec.name = "half_plus_two"
        task.model_spec.signature_name = signature
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    result = predictions.MultiInference(request, TIMEOUT)
    assert len(result.results) == 2
    assert result.results[0].regression_result.regressions[0].value == 3.0
    assert result.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for task, answer in zip(request.tasks, result.results):
        assert answer.model_spec.signature_name == task.model_spec.signature_name
        assert answer.model_spec.version.value == 123


def _code(call, request):
    with pytest.raises(grpc.RpcError) as caught:
        call(request, TIMEOUT)
    return caught.value.code(), caught.value.details()


def test_examples_methods_refuse_wrong_signatures_and_requests(predictions):
    code, details = _code(predictions.Classify, examples_request(classification_pb2.ClassificationRequest(),
                                                                 signature="regress_x_to_y"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == ("Expected classify signature method_name to be tensorflow/serving/classify. "
                       "Was: tensorflow/serving/regress")
    code, details = _code(predictions.Regress, examples_request(regression_pb2.RegressionRequest(), values=()))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    code, details = _code(predictions.Regress, examples_request(regression_pb2.RegressionRequest(), model="nope",
                                                                signature="regress_x_to_y"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details

    duplicate = inference_pb2.MultiInferenceRequest()
    for _ in range(2):
        task = duplicate.tasks.add(method_name="tensorflow/serving/regress")
        task.model_spec.name = "half_plus_two"
        task.model_spec.signature_name = "regress_x_to_y"
    duplicate.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    assert _code(predictions.MultiInference, duplicate) == (
        grpc.StatusCode.INVALID_ARGUMENT, "Duplicate evaluation of signature: regress_x_to_y")
    duplicate.tasks[1].model_spec.name = "half_plus_two_tf2"
    assert _code(predictions.MultiInference, duplicate)[1] == (
        "All ModelSpecs in a MultiInferenceRequest must access the same model name.")


def test_model_status_and_metadata_grpc(models, predictions):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "half_plus_two"
    result = models.GetModelStatus(request, TIMEOUT)
    assert [(s.version, s.status.error_code) for s in result.model_version_status] == [(123, 0)]

    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata_request.model_spec.name = "half_plus_two"
    metadata = predictions.GetModelMetadata(metadata_request, TIMEOUT)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    assert sorted(signatures.signature_def) == ["classify_x_to_y", "regress_x_to_y", "regress_x_to_y2", "serving_default"]
    assert signatures.signature_def["regress_x_to_y"].method_name == "tensorflow/serving/regress"


def test_reload_config_adds_and_drops_models(hp_server, half_plus_two_base, models, predictions):
    def reload(*names):
        request = model_management_pb2.ReloadConfigRequest()
        for name in names:
            request.config.model_config_list.config.add(
                name=name, base_path=str(half_plus_two_base / "half_plus_two"), model_platform="tensorflow")
        return models.HandleReloadConfigRequest(request, TIMEOUT)

    try:
        assert reload("half_plus_two", "half_plus_two_tf2", "renamed").status.error_code == 0
        assert tf.make_ndarray(predictions.Predict(predict_request("renamed", [4.0]), TIMEOUT).outputs["y"]).tolist() == [4.0]
        reload("half_plus_two", "half_plus_two_tf2")
        assert _code(predictions.Predict, predict_request("renamed", [4.0]))[0] == grpc.StatusCode.NOT_FOUND
        empty = model_management_pb2.ReloadConfigRequest()
        empty.config.model_config_list.SetInParent()
        assert _code(models.HandleReloadConfigRequest, empty)[0] == grpc.StatusCode.INVALID_ARGUMENT
        custom = model_management_pb2.ReloadConfigRequest()
        custom.config.custom_model_config.Pack(model_server_config_pb2.ModelServerConfig())
        assert _code(models.HandleReloadConfigRequest, custom)[0] == grpc.StatusCode.UNIMPLEMENTED
    finally:
        # Leave the session server as configured (the tf2 model from its own folder).
        from kvlm.serving import ModelConfig

        hp_server.manager.reload([ModelConfig(n, half_plus_two_base / n, labels={"stable": 123})
                                  for n in ("half_plus_two", "half_plus_two_tf2")])


def test_rest_documented_answers(hp_server):
    assert rest(hp_server, "/v1/models/half_plus_two:predict", {"instances": [2.0, 3.0, 4.0]}) == (
        200, {"predictions": [3.0, 3.5, 4.0]})
    assert rest(hp_server, "/v1/models/half_plus_two:predict", {"inputs": [2.0, 3.0, 4.0]}) == (
        200, {"outputs": [3.0, 3.5, 4.0]})
    assert rest(hp_server, "/v1/models/half_plus_two:classify",
                {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}) == (200, {"results": [[["", 3.0]]]})
    assert rest(hp_server, "/v1/models/half_plus_two:regress",
                {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}) == (200, {"results": [3.0]})
    assert rest(hp_server, "/v1/models/half_plus_two") == (200, {"model_version_status": [{
        "version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})


def test_rest_versions_labels_named_inputs_and_metadata(hp_server):
    for path in ("/v1/models/half_plus_two_tf2/versions/123", "/v1/models/half_plus_two_tf2/labels/stable"):
        assert rest(hp_server, path + ":predict", {"instances": [{"x": 0.1}, {"x": 1.0}]}) == (
            200, {"predictions": [2.05, 2.5]})  # float32 results with their shortest representation
        assert rest(hp_server, path + ":predict", {"inputs": {"x": [0.0]}}) == (200, {"outputs": [2.0]})
    status, metadata = rest(hp_server, "/v1/models/half_plus_two/versions/123/metadata")
    assert status == 200
    assert metadata["model_spec"] == {"name": "half_plus_two", "signature_name": "", "version": "123"}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert signature["method_name"] == "tensorflow/serving/predict"
    # As TF Serving prints it: every field, empty ones included.
    assert signature["defaults"] == {}
    assert signature["inputs"]["x"]["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}],
                                                        "unknown_rank": False}


@pytest.mark.parametrize(
    "path, body, raw, status, message",
    [
        ("/v1/models/nope:predict", {"instances": [1.0]}, None, 404, "Model 'nope' is not served"),
        ("/v1/models/half_plus_two/versions/7:predict", {"instances": [1.0]}, None, 404, "version 7 is not available"),
        ("/v1/models/half_plus_two:predict", None, b"{not json", 400, "JSON Parse error"),
        ("/v1/models/half_plus_two:predict", {"instances": [1.0], "inputs": [1.0]}, None, 400, "exactly one of"),
        ("/v1/models/half_plus_two:predict", {"instances": ["a"]}, None, 400, "input 'x'"),
        ("/v1/models/half_plus_two:predict", {"instances": [1.0], "signature_name": "none"}, None, 404, "no signature"),
        ("/v1/models/half_plus_two:regress", {"examples": [{"x": 1.0}]}, None, 400, "Expected regress signature"),
        ("/v1/models/half_plus_two:explain", {}, None, 404, "Malformed request: POST /v1/models/half_plus_two:explain"),
        ("/v2/models", None, None, 404, "Malformed request: GET /v2/models"),
    ],
)
def test_rest_errors(hp_server, path, body, raw, status, message):
    code, answer = rest(hp_server, path, body, raw)
    assert code == status
    assert list(answer) == ["error"] and message in answer["error"]


def test_prometheus_metrics_under_tf_serving_names(hp_server, predictions):
    predictions.Predict(predict_request("half_plus_two_tf2", [1.0]), TIMEOUT)
    rest(hp_server, "/v1/models/half_plus_two_tf2:predict", {"instances": [1.0]})
    rest(hp_server, "/v1/models/half_plus_two_tf2:predict", {"instances": ["bad"]})
    url = f"http://127.0.0.1:{hp_server.rest_port}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples[':tensorflow:serving:request_count{model_name="half_plus_two_tf2",status="OK"}'] >= 2
    assert samples[':kvlm:serving:error_count{API="predict",code="INVALID_ARGUMENT",model_name="half_plus_two_tf2"}'] >= 1
    assert samples[':tensorflow:serving:request_latency_count{API="predict",entrypoint="REST",'
                   'model_name="half_plus_two_tf2"}'] >= 2
    assert samples[':tensorflow:serving:request_latency_count{API="predict",entrypoint="GRPC",'
                   'model_name="half_plus_two_tf2"}'] >= 1
    path = str(hp_server.options.models[1].base_path / "00000123")
    assert samples[f':tensorflow:cc:saved_model:load_attempt_count{{model_path="{path}",status="success"}}'] >= 1


def test_zero_padded_versions_served_and_skipped_folders_logged(half_plus_two_base, tmp_path, caplog):
    import shutil

    from kvlm.serving import ModelConfig, Server, ServerOptions

    base = tmp_path / "m"
    shutil.copytree(half_plus_two_base / "half_plus_two_tf2", base)
    (base / "00000124").mkdir()  # an export still being written
    (base / "tmp-export").mkdir()
    shutil.copytree(base / "00000123", base / "123")  # the same version twice
    caplog.set_level(logging.WARNING, logger="kvlm.serving.models")
    with Server(ServerOptions([ModelConfig("m", base)], port=0, file_system_poll_wait_seconds=0)) as server:
        assert sorted(server.manager.model("m").versions) == [123]
        server.manager.refresh()  # a second poll logs nothing new
    skipped = sorted(r.getMessage().split("skipping ")[1] for r in caplog.records)
    assert skipped == sorted([
        f"{base / '123'}: version 123 is already served from 00000123",
        f"{base / '00000124'}: no saved_model.pb or saved_model.pbtxt in it (yet)",
        f"{base / 'tmp-export'}: not a version number (a non-negative integer)",
    ])


def test_every_method_answers_cleanly_without_traces_in_the_log(predictions, caplog):
    """Bad requests to every method get a status code, and the log holds no stack trace."""
    caplog.set_level(logging.DEBUG)
    calls = [
        (predictions.Predict, predict_pb2.PredictRequest()),
        (predictions.Classify, classification_pb2.ClassificationRequest()),
        (predictions.Regress, regression_pb2.RegressionRequest()),
        (predictions.MultiInference, inference_pb2.MultiInferenceRequest()),
        (predictions.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest()),
    ]
    for call, request in calls:
        assert _code(call, request)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_rest_takes_the_same_bearer_token_as_grpc(half_plus_two_base):
    from kvlm.serving import ModelConfig, Server, ServerOptions

    options = ServerOptions([ModelConfig("half_plus_two", half_plus_two_base / "half_plus_two")], port=0,
                            rest_api_port=0, auth_token="s3cret", file_system_poll_wait_seconds=0)
    with Server(options) as server:
        url = f"http://127.0.0.1:{server.rest_port}/v1/models/half_plus_two:predict"
        body = json.dumps({"instances": [2.0]}).encode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=TIMEOUT)
        assert caught.value.code == 401 and "bearer token" in json.loads(caught.value.read())["error"]
        request = urllib.request.Request(url, data=body, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            assert json.loads(response.read()) == {"predictions": [3.0]}
