"""Probes: `grpc.health.v1` on the gRPC port and the Open Inference Protocol's health endpoints on REST.

Driven by the official `grpc_health` stub and a plain HTTP client against real servers on
127.0.0.1 serving TF Serving's `half_plus_two` test model.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.tensorflow_only

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TIMEOUT = 30


def _status(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """`(HTTP status, body)` of a GET on the REST port."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _check(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def _server(models: dict, poll_seconds: float = 0, token: str | None = None):
    from kvlm.serving import ModelConfig, Server, ServerOptions

    options = ServerOptions([ModelConfig(name, path) for name, path in models.items()], port=0, rest_api_port=0,
                            file_system_poll_wait_seconds=poll_seconds, auth_token=token)
    server = Server(options)
    server.start()
    return server


def test_a_served_model_is_live_and_ready_over_both_apis(hp_server):
    port = hp_server.rest_port
    assert _status(port, "/v2/health/live") == (200, b"")
    assert _status(port, "/v2/health/ready") == (200, b"")
    assert _status(port, "/v2/models/half_plus_two/ready") == (200, b"")
    assert _status(port, "/v2/models/half_plus_two/versions/123/ready") == (200, b"")
    assert _status(port, "/v2/models/half_plus_two/versions/7/ready") == (400, b"")
    code, body = _status(port, "/v2/models/no_such_model/ready")
    assert code == 404 and b"no_such_model" in body and b"half_plus_two" in body
    for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                    "half_plus_two", "half_plus_two_tf2"):
        assert _check(hp_server.port, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as error:
        _check(hp_server.port, "no_such_model")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_ready_only_once_every_model_has_a_version(half_plus_two_base, tmp_path):
    """A configured model without a version keeps the server live but not ready, over gRPC and
    REST, until a version appears in its base path and the poll loads it."""
    waiting = tmp_path / "later"
    waiting.mkdir()
    server = _server({"half_plus_two": half_plus_two_base / "half_plus_two", "later": waiting}, poll_seconds=0.2)
    try:
        port = server.rest_port
        assert _status(port, "/v2/health/live")[0] == 200
        assert _status(port, "/v2/health/ready")[0] == 400
        assert _status(port, "/v2/models/later/ready")[0] == 400
        assert _status(port, "/v2/models/half_plus_two/ready")[0] == 200
        assert _check(server.port, "") == NOT_SERVING
        assert _check(server.port, "later") == NOT_SERVING
        assert _check(server.port, "half_plus_two") == SERVING

        version = next((half_plus_two_base / "half_plus_two_tf2").iterdir())
        shutil.copytree(version, tmp_path / "staging")
        (tmp_path / "staging").rename(waiting / version.name)  # whole, as an exporter writes it
        deadline = time.monotonic() + TIMEOUT
        while _status(port, "/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(port, "/v2/health/ready")[0] == 200
        assert _check(server.port, "") == SERVING
        assert _check(server.port, "later") == SERVING
    finally:
        server.stop(grace=1)


def test_health_needs_no_token_where_the_models_do(half_plus_two_base):
    server = _server({"half_plus_two": half_plus_two_base / "half_plus_two"}, token="s3cret")
    try:
        assert _check(server.port, "") == SERVING
        assert _status(server.rest_port, "/v2/health/ready")[0] == 200
        assert _status(server.rest_port, "/v2/models/half_plus_two/ready")[0] == 401
        assert _status(server.rest_port, "/v2/models/half_plus_two/ready", token="s3cret")[0] == 200
        assert _status(server.rest_port, "/v1/models/half_plus_two")[0] == 401
    finally:
        server.stop(grace=1)


def test_a_watcher_hears_not_serving_when_the_server_stops(half_plus_two_base):
    server = _server({"half_plus_two": half_plus_two_base / "half_plus_two"})
    heard, first = [], threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")

    def watch():
        try:
            for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                heard.append(response.status)
                first.set()
        except grpc.RpcError:
            pass  # the server has gone

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert first.wait(TIMEOUT)
        server.stop(grace=2)
        watcher.join(TIMEOUT)
    finally:
        channel.close()
        server.stop(grace=1)
    assert heard[0] == SERVING
    assert NOT_SERVING in heard[1:], heard
