"""Which expert answered, and experts chosen per request, through `kvlm serve`.

The default suite serves a small SavedModel whose `choose_experts` signature parses `experts` with
the export's own `allowed_experts` (each example answered by the first expert it allows, else the
base); the slow test serves the released base with the first-party experts installed and rolls
out a new version while 32 clients send traffic.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from test_serving_open_inference import _post

pytestmark = pytest.mark.tensorflow_only

EXPERTS = ("legal", "medical")


class _FirstAllowed(tf.Module):
    """`expert`: the first expert an example allows (the base when none); `expert_weight`: 1."""

    def __init__(self):
        super().__init__()
        self.names = tf.constant(["base", *EXPERTS])

    def _answer(self, text, allowed):
        slot = tf.where(tf.reduce_any(allowed, -1), tf.argmax(tf.cast(allowed, tf.int32), -1, tf.int32) + 1, 0)
        return {"answer": text, "expert": tf.gather(self.names, slot), "expert_weight": tf.ones_like(text, tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                  tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, image_bytes, text):
        return self._answer(text, tf.ones(tf.stack([tf.shape(text)[0], len(EXPERTS)]), tf.bool))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                  tf.TensorSpec([None], tf.string, name="text"),
                                  tf.TensorSpec([None], tf.string, name="experts")])
    def choose(self, image_bytes, text, experts):
        from kvlm.export.signatures import allowed_experts

        return self._answer(text, allowed_experts(experts, EXPERTS))


@pytest.fixture(scope="module")
def experts_server(tmp_path_factory):
    from kvlm.serving import ModelConfig, Server, ServerOptions

    base = tmp_path_factory.mktemp("first_allowed")
    module = _FirstAllowed()
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve,
                                                             "choose_experts": module.choose})
    options = ServerOptions([ModelConfig("experts", base)], port=0, rest_api_port=0,
                            prometheus_path="/metrics", file_system_poll_wait_seconds=0)
    server = Server(options)
    server.start()
    yield server
    server.stop(grace=1)


def _predict(stub, texts, experts=None, model="experts"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([b""] * len(texts), dtype=tf.string))
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
    if experts is not None:
        request.model_spec.signature_name = "choose_experts"
        request.inputs["experts"].CopyFrom(tf.make_tensor_proto(experts, dtype=tf.string))
    return stub.Predict(request, timeout=30)


def _expert_count(server, model: str, expert: str) -> float:
    return server.metrics.value("expert_answer_count", model, expert)


def test_experts_chosen_per_example_over_tf_serving_grpc(experts_server):
    with grpc.insecure_channel(f"127.0.0.1:{experts_server.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        before = _expert_count(experts_server, "experts", "medical")
        answer = _predict(stub, ["a", "b", "c", "d"], ["medical", "", " legal , medical", "medical,legal"])
        assert list(tf.make_ndarray(answer.outputs["expert"])) == [b"medical", b"base", b"legal", b"legal"]
        assert _expert_count(experts_server, "experts", "medical") == before + 1
        with pytest.raises(grpc.RpcError) as error:
            _predict(stub, ["a", "b"], ["medical", "nope,legal"])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Unknown expert name(s) in experts; the experts are legal, medical" in error.value.details()
        assert "nope" in error.value.details()


def test_v2_experts_parameter_restricts_every_example_of_the_request(experts_server):
    text = {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}
    image = {"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": ["", ""]}

    def experts_of(parameters):
        status, answer = _post(experts_server, "/v2/models/experts/infer", {"inputs": [image, text],
                                                                             "parameters": parameters})
        assert status == 200, answer
        return next(o["data"] for o in answer["outputs"] if o["name"] == "expert")

    assert experts_of({}) == ["legal", "legal"]  # serving_default: every expert allowed
    assert experts_of({"experts": "medical"}) == ["medical", "medical"]
    assert experts_of({"experts": ""}) == ["base", "base"]
    status, answer = _post(experts_server, "/v2/models/experts/infer",
                           {"inputs": [image, text], "parameters": {"experts": "nope"}})
    assert status == 400 and "the experts are legal, medical" in answer["error"]
    status, answer = _post(experts_server, "/v2/models/experts/infer",
                           {"inputs": [image, text], "parameters": {"experts": 3}})
    assert status == 400 and "comma-separated expert names" in answer["error"]


def test_prometheus_counts_answers_per_model_and_expert(experts_server):
    from urllib.request import urlopen

    with grpc.insecure_channel(f"127.0.0.1:{experts_server.port}") as channel:
        _predict(prediction_service_pb2_grpc.PredictionServiceStub(channel), ["a"] * 3, [""] * 3)
    with urlopen(f"http://127.0.0.1:{experts_server.rest_port}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    counts = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in lines
              if line.startswith(":kvlm:serving:expert_answer_count{")}
    assert counts['expert="base",model_name="experts"'] >= 3


@pytest.mark.slow
def test_installing_experts_rolls_out_under_load_with_no_failed_request(tmp_path):
    """The released base with the legal expert is served as version 1; the same base with every
    first-party expert is written as version 2 while 32 clients send Predict calls. Every call
    succeeds, and once version 2 answers, medical scans are answered by the medical expert."""
    from kvlm.domain_experts import Base, install_experts
    from kvlm.domain_experts.report import held_out_examples, write_installed_run
    from kvlm.export.savedmodel import export_model
    from kvlm.serving import ModelConfig, Server, ServerOptions

    base = Base.load("kvlm_tiny_vqa")
    try:
        everything = install_experts(base, "installed")
    except ValueError as error:
        pytest.skip(f"first-party plugins not installed: {error}")
    models, staging = tmp_path / "models", tmp_path / "staging"
    export_model(write_installed_run(install_experts(base, ["legal"]), tmp_path / "v1", 20), models, "kvlm", 1)
    new_version = export_model(write_installed_run(everything, tmp_path / "v2", 20), staging, "kvlm", 2)
    medical = held_out_examples(base, everything, 8, seed=4)["medical"]
    images = [tf.io.encode_png(np.asarray(e.image, np.uint8)).numpy() for e in medical]
    texts = [e.question for e in medical]

    server = Server(ServerOptions([ModelConfig("kvlm", models / "kvlm")], port=0,
                                  file_system_poll_wait_seconds=0.2))
    server.start()
    stop, lock = threading.Event(), threading.Lock()
    calls = {"sent": 0, "failed": [], "by_version": {}}

    def client(index: int):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                request = predict_pb2.PredictRequest()
                request.model_spec.name = "kvlm"
                request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images[index % 8:index % 8 + 1]))
                request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts[index % 8:index % 8 + 1]))
                try:
                    response = stub.Predict(request, timeout=60)
                    version, expert = response.model_spec.version.value, response.outputs["expert"].string_val[0]
                except grpc.RpcError as error:
                    version, expert = None, None
                    with lock:
                        calls["failed"].append(f"{error.code().name}: {error.details()}")
                with lock:
                    calls["sent"] += 1
                    if version is not None:
                        calls["by_version"].setdefault(version, set()).add(expert.decode())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3)
        shutil.copytree(new_version, models / "kvlm" / ".incoming")
        started = time.perf_counter()
        (models / "kvlm" / ".incoming").rename(models / "kvlm" / "2")
        while 2 not in calls["by_version"] and time.perf_counter() - started < 120:
            time.sleep(0.05)
        rolled_out = time.perf_counter() - started
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        server.stop(grace=5)
    figure = {"clients": 32, "requests": calls["sent"], "failed": len(calls["failed"]),
              "rollout_seconds": round(rolled_out, 2)}
    print("rollout", json.dumps(figure))
    assert calls["failed"] == [] and calls["sent"] > 100
    assert calls["by_version"][1] == {"base"}  # the legal expert admits no medical scan
    assert "medical" in calls["by_version"][2]
