"""A real exported model, an in-process server on a free port, and clients for it.

The server only needs plain TensorFlow; the export step needs a Keras backend that
can export, so the server tests are marked `tensorflow_only` and run once per suite.
"""

from __future__ import annotations

import pytest

MAX_MESSAGE_BYTES = 1024 * 1024


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """`(run_dir, version_dir)` of a tiny exported run (shared with tests/export)."""
    from kvlm.export.testing import tiny_export

    return tiny_export(tmp_path_factory.getbasetemp() / "kvlm_tiny_export")


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    """An unbatched in-process server for model "kvlm" (version 1) over gRPC and REST, 1 MiB message limit."""
    from kvlm.export.testing import copy_version
    from kvlm.serving import ModelConfig, Server, ServerOptions

    base = copy_version(exported[1], tmp_path_factory.mktemp("served"))
    options = ServerOptions(
        [ModelConfig("kvlm", base, labels={"stable": 1})], port=0, rest_api_port=0,
        max_message_bytes=MAX_MESSAGE_BYTES, file_system_poll_wait_seconds=0,
    )
    server = Server(options)
    server.start()
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(target):
    from kvlm.serving import PredictClient

    with PredictClient(target, timeout=60) as client:
        yield client


@pytest.fixture
def stub(target):
    """The official PredictionService stub on a fresh channel."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 * MAX_MESSAGE_BYTES)])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def examples():
    """Eight PNG images (32x32) and their questions."""
    from kvlm.export.testing import example_requests

    return example_requests(8, image_size=32, seed=5)


@pytest.fixture(scope="session")
def half_plus_two_base(tmp_path_factory):
    """A base path with TF Serving's test models in version folder 00000123: `half_plus_two`
    (TF1 graph with classify/regress signatures) and `half_plus_two_tf2` (`tf.saved_model.save`)."""
    from half_plus_two import VERSION_FOLDER, write_tf1, write_tf2

    base = tmp_path_factory.mktemp("half_plus_two")
    write_tf1(base / "half_plus_two" / VERSION_FOLDER)
    write_tf2(base / "half_plus_two_tf2" / VERSION_FOLDER)
    return base


@pytest.fixture(scope="session")
def hp_server(half_plus_two_base):
    """An in-process server for the half_plus_two models: gRPC, REST and Prometheus on free ports."""
    from kvlm.serving import ModelConfig, Server, ServerOptions

    options = ServerOptions(
        [ModelConfig(name, half_plus_two_base / name, labels={"stable": 123}) for name in ("half_plus_two", "half_plus_two_tf2")],
        port=0, rest_api_port=0, prometheus_path="/monitoring/prometheus/metrics", file_system_poll_wait_seconds=0,
    )
    server = Server(options)
    server.start()
    yield server
    server.stop(grace=1)
