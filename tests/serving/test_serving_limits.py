"""Resource limits: image sizes read from headers (in the server and in the exported graph),
the shared decode memory budget, and a hostile campaign of 20000x20000 PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import tensorflow as tf

from hostile import huge_png, image
from kvlm.serving.limits import DecodeBudget, decode_bytes, image_size

pytestmark = pytest.mark.tensorflow_only

REPO = Path(__file__).resolve().parents[2]
KINDS = ("PNG", "JPEG", "GIF", "BMP")


@pytest.fixture(scope="module")
def hostile_png() -> bytes:
    return huge_png(20000, 20000)


@pytest.mark.parametrize("kind", KINDS)
def test_header_sizes_in_python_and_in_the_graph(kind):
    from kvlm.data.preprocessing import decode_image, image_header_size

    data = image(kind, 5, 7)
    assert image_size(data) == (5, 7)
    assert image_header_size(tf.constant(data)).numpy().tolist() == [5, 7]
    assert decode_image(tf.constant(data), max_pixels=35).shape == (5, 7, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 34 pixels"):
        decode_image(tf.constant(data), max_pixels=34)


def test_header_sizes_of_a_batch_are_read_element_wise(hostile_png):
    from kvlm.data.preprocessing import image_header_size
    from kvlm.export.signatures import preprocess_images

    batch = [image(kind, 5 + i, 7 + i) for i, kind in enumerate(KINDS)] + [b"junk", hostile_png]
    expected = [[5, 7], [6, 8], [7, 9], [8, 10], [-1, -1], [20000, 20000]]
    assert image_header_size(tf.constant(batch)).numpy().tolist() == expected
    grid = image_header_size(tf.constant([batch[:3], batch[3:]])).numpy()
    assert grid.shape == (2, 3, 2) and grid.reshape(-1, 2).tolist() == expected
    # The serving graph checks the whole batch before it decodes any image.
    assert preprocess_images(tf.constant(batch[:4]), 8).shape == (4, 8, 8, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 16777216 pixels"):
        preprocess_images(tf.constant(batch[:4] + batch[5:]), 8)


def test_unknown_bytes_have_no_header_size_and_training_decodes_without_a_bound(hostile_png):
    from kvlm.data.preprocessing import decode_image, image_header_size

    assert image_size(b"not an image") is None
    assert image_header_size(tf.constant(b"ab")).numpy().tolist() == [-1, -1]
    assert image_header_size(tf.constant(hostile_png)).numpy().tolist() == [20000, 20000]
    assert len(hostile_png) < 500_000
    assert decode_image(tf.constant(image("PNG", 300, 200))).shape == (300, 200, 3)  # the training path: no bound


def test_decode_bytes_and_budget():
    import numpy as np

    from kvlm.serving.errors import ServingError

    arrays = {"image_bytes": np.array([image("PNG", 10, 10), image("GIF", 2, 3)], dtype=object),
              "text": np.array([b"a question", b"b"], dtype=object)}
    assert decode_bytes(arrays, max_pixels=100) == (100 + 6) * 4
    with pytest.raises(ServingError, match="10x10 = 100 pixels, above the server's limit of 99"):
        decode_bytes(arrays, max_pixels=99)
    budget = DecodeBudget(1000, wait_seconds=0.2)
    budget.acquire(600)
    with pytest.raises(ServingError, match="in use") as caught:
        budget.acquire(600)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    threading.Timer(0.05, budget.release, (600,)).start()
    budget.acquire(600)  # waits for the first request to finish
    with pytest.raises(ServingError, match="more than the server's decode memory"):
        budget.acquire(2000)


def test_exported_graph_refuses_huge_images_before_decoding(exported, hostile_png, examples):
    """The bound is in the SavedModel itself, so the official TF Serving binary is protected too."""
    model = tf.saved_model.load(str(exported[1]))
    serve = model.signatures["serving_default"]
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than 16777216 pixels"):
        serve(image_bytes=tf.constant([hostile_png]), text=tf.constant(["what colour is the circle?"]))
    assert time.perf_counter() - start < 5
    images, texts = examples
    assert serve(image_bytes=tf.constant(images[:1]), text=tf.constant(texts[:1]))["answer"].shape == (1,)


def _campaign(stub, hostile_png, examples, count: int = 8):
    from test_serving_predict import make_request

    images, texts = examples
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(count) as pool:
        calls = [pool.submit(stub.Predict, make_request([hostile_png], texts[:1]), timeout=120) for _ in range(count)]
        codes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            codes.append(caught.value.code())
    seconds = time.perf_counter() - start
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    good = stub.Predict(make_request(images[:1], texts[:1]), timeout=60)
    assert good.outputs["answer"].string_val
    return seconds, codes


def test_hostile_campaign_in_process(stub, hostile_png, examples):
    seconds, codes = _campaign(stub, hostile_png, examples)
    assert seconds < 5 and codes == [grpc.StatusCode.INVALID_ARGUMENT] * 8


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags", [[], ["--max_image_pixels=0", "--max_decode_bytes=0"]], ids=["server_limits", "graph_limit_only"]
)
def test_hostile_campaign_against_a_server_process(exported, hostile_png, examples, tmp_path, flags):
    """8 concurrent 20000x20000 PNGs against `kvlm serve`: refused within seconds, the next good
    request answered, peak resident memory under 3 GB (with the server's limit, and with only the
    exported graph's)."""
    from kvlm.export.testing import copy_version
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    base = copy_version(exported[1], tmp_path)
    command = [sys.executable, "-m", "kvlm", "serve", "--port=0", "--model_name=kvlm",
               f"--model_base_path={base}", "--file_system_poll_wait_seconds=0", *flags]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        line = process.stdout.readline()
        assert line.startswith("Running gRPC ModelServer at"), line
        channel = grpc.insecure_channel(line.split()[-1], options=[("grpc.max_send_message_length", 1 << 26)])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        before = _peak_rss_bytes(process.pid)
        seconds, codes = _campaign(stub, hostile_png, examples)
        peak = _peak_rss_bytes(process.pid)
        print(f"campaign {flags}: {seconds:.2f}s, codes {sorted({c.name for c in codes})}, "
              f"peak RSS {before / 2**20:.0f} MiB before, {peak / 2**20:.0f} MiB after")
        assert seconds < 10 and peak < 3 * 2**30
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
