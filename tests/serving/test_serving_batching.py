"""Batching: concurrent requests merge into batches > 1, results stay with their request,
a bad request in a batch fails alone, padding to allowed sizes, a full queue."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

from kvlm.serving.batching import Batcher
from kvlm.serving.config import BatchingConfig
from kvlm.serving.errors import ServingError

pytestmark = pytest.mark.tensorflow_only


def _concurrently(stub, requests):
    """Sends all requests at once; returns (response, batch size) or the RpcError for each."""
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i):
        barrier.wait()
        try:
            response, call = stub.Predict.with_call(requests[i], timeout=120)
            results[i] = (response, int(dict(call.trailing_metadata())["kvlm-batch-size"]))
        except grpc.RpcError as error:
            results[i] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.fixture(scope="module")
def batched_stub(exported, tmp_path_factory):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from kvlm.export.testing import copy_version
    from kvlm.serving import ModelConfig, Server, ServerOptions

    base = copy_version(exported[1], tmp_path_factory.mktemp("batched"))
    # A long timeout so that concurrent requests merge even on a busy machine.
    batching = BatchingConfig(max_batch_size=8, batch_timeout_micros=500_000, num_batch_threads=1)
    server = Server(ServerOptions([ModelConfig("kvlm", base)], port=0, batching=batching,
                                  file_system_poll_wait_seconds=0))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel), server
    channel.close()
    server.stop(grace=1)


def test_concurrent_requests_are_merged(batched_stub, stub, examples):
    from test_serving_predict import make_request

    batched, server = batched_stub
    images, texts = examples
    requests = [make_request([images[i]], [texts[i]]) for i in range(8)]
    results = _concurrently(batched, requests)
    sizes = [size for _, size in results]
    assert max(sizes) > 1, sizes
    stats = server.stats()["kvlm"]["1"]["serving_default"]
    assert stats["max_batch_size"] > 1 and stats["requests"] == 8 and stats["batches"] < 8
    for request, (response, _) in zip(requests, results):
        alone = stub.Predict(request, timeout=60)  # the unbatched session server
        for name in ("answer", "labels"):
            assert tf.make_ndarray(response.outputs[name]).tolist() == tf.make_ndarray(alone.outputs[name]).tolist()
        np.testing.assert_allclose(
            tf.make_ndarray(response.outputs["scores"]), tf.make_ndarray(alone.outputs["scores"]), atol=1e-5
        )


def test_bad_request_in_a_batch_fails_alone(batched_stub, examples):
    from test_serving_predict import make_request

    batched, _ = batched_stub
    images, texts = examples
    requests = [make_request([images[i]], [texts[i]]) for i in range(6)]
    requests[2] = make_request([b"not an image"], ["q"])
    requests[4] = make_request([images[0], b""], ["q", "q"])
    results = _concurrently(batched, requests)
    for i, result in enumerate(results):
        if i in (2, 4):
            assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert not isinstance(result, grpc.RpcError), result
    response, _ = _concurrently(batched, requests[:1])[0]
    assert tf.make_ndarray(response.outputs["answer"]).shape == (1,)


def test_batches_are_padded_to_allowed_sizes():
    seen = []

    def run(inputs):
        seen.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2, "n": np.full(len(inputs["x"]), len(inputs["x"]))}

    batcher = Batcher(run, BatchingConfig(max_batch_size=8, batch_timeout_micros=200_000, allowed_batch_sizes=(4, 8)))
    futures = [batcher.submit({"x": np.array([float(i)])}, 1) for i in range(3)]
    results = [f.result(timeout=30) for f in futures]
    batcher.close()
    assert seen == [4]
    assert [r[0]["y"].tolist() for r in results] == [[0.0], [2.0], [4.0]]
    assert {r[1] for r in results} == {3}
    assert batcher.stats.snapshot()["batch_sizes"] == {3: 1}


def test_full_queue_is_resource_exhausted():
    release = threading.Event()

    def run(inputs):
        release.wait(30)
        return {"y": inputs["x"]}

    batcher = Batcher(run, BatchingConfig(max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=1))
    first = batcher.submit({"x": np.zeros(2)}, 2)  # taken by the batch thread, which blocks
    while batcher._pending:
        time.sleep(0.001)
    queued = batcher.submit({"x": np.zeros(2)}, 2)  # fills the queue
    with pytest.raises(ServingError) as error:
        batcher.submit({"x": np.zeros(1)}, 1)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in error.value.message
    release.set()
    assert first.result(timeout=30)[1] == 2 and queued.result(timeout=30)[1] == 2
    batcher.close()
