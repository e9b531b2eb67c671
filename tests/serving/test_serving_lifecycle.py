"""Server life cycle: new versions picked up while serving, `kvlm serve` as a process
with graceful SIGTERM shutdown, `kvlm predict`, TLS and bearer-token auth."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvlm.cli import main
from kvlm.export.testing import copy_version
from kvlm.serving import ModelConfig, PredictClient, Server, ServerOptions

pytestmark = [pytest.mark.tensorflow_only, pytest.mark.long]

REPO = Path(__file__).resolve().parents[2]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_new_version_exported_while_serving_is_picked_up(exported, tmp_path, examples, capsys):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from test_serving_predict import make_request

    run_dir, version_dir = exported
    base = copy_version(version_dir, tmp_path)
    server = Server(ServerOptions([ModelConfig("kvlm", base)], port=0, file_system_poll_wait_seconds=0.2))
    server.start()
    images, texts = examples
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    served_versions, errors, stop = [], [], threading.Event()

    def keep_asking():  # traffic throughout the roll-out must never fail
        while not stop.is_set():
            try:
                response = stub.Predict(make_request(images[:1], texts[:1]), timeout=60)
                served_versions.append(response.model_spec.version.value)
            except grpc.RpcError as error:
                errors.append(f"{error.code()}: {error.details()}")
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        assert main(["export", "--model", str(run_dir), "--base-path", str(tmp_path), "--name", "kvlm"]) == 0
        assert str(base / "2") in capsys.readouterr().out
        with PredictClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            states = _wait_for(
                lambda: (s := {x["version"]: x["state"] for x in client.status("kvlm")}).get(1) == "END" and s,
                120, "version 2 to replace version 1",
            )
            assert states == {1: "END", 2: "AVAILABLE"}
        _wait_for(lambda: served_versions[-1:] == [2], 30, "a response from version 2")
    finally:
        stop.set()
        asker.join()
        channel.close()
        server.stop(grace=1)
    assert not errors
    assert served_versions[0] == 1 and served_versions[-1] == 2


def test_a_version_is_unloaded_only_after_the_requests_running_on_it(exported, tmp_path, examples):
    from kvlm.serving.models import ServedModel, State

    base = copy_version(exported[1], tmp_path)
    model = ServedModel(ModelConfig("kvlm", base), batching=None)
    model.refresh()
    images, texts = examples
    arrays = {"image_bytes": np.array(images[:1], dtype=object), "text": np.array(texts[:1], dtype=object)}
    unloaded = threading.Event()
    with model.use() as loaded:
        signature = loaded.signature("serving_default")
        expected = signature.run(arrays)
        shutil.rmtree(base / "1")  # gone from disk: the next refresh unloads it
        unloader = threading.Thread(target=lambda: (model.refresh(), unloaded.set()))
        unloader.start()
        _wait_for(lambda: 1 not in model.versions, 30, "version 1 to stop taking new requests")
        assert model.status[1].state == State.UNLOADING and not unloaded.wait(0.5)
        np.testing.assert_array_equal(signature.run(arrays)["scores"], expected["scores"])  # still runs
    unloader.join(30)
    assert unloaded.is_set() and model.status[1].state == State.END


def test_broken_version_is_reported_and_the_previous_one_serves(exported, tmp_path, examples):
    base = copy_version(exported[1], tmp_path)
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    images, texts = examples
    with Server(ServerOptions([ModelConfig("kvlm", base)], port=0, file_system_poll_wait_seconds=0.2)) as server:
        with PredictClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            statuses = {s["version"]: s for s in client.status("kvlm")}
            assert statuses[1]["state"] == "AVAILABLE"
            assert statuses[2]["state"] == "END" and statuses[2]["error_code"] != 0
            assert "Failed to load" in statuses[2]["error_message"]
            assert client.ask("kvlm", images[:1], texts[:1])["answer"].shape == (1,)
            # Fixing the files makes the server try again and roll forward.
            shutil.rmtree(base / "2")
            shutil.copytree(exported[1], tmp_path / "staging")
            (tmp_path / "staging").rename(base / "2")
            _wait_for(
                lambda: {s["version"]: s["state"] for s in client.status("kvlm")} == {1: "END", 2: "AVAILABLE"},
                120, "the repaired version 2",
            )


def _start_serve(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "kvlm", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=180)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"kvlm serve did not start: {process.stderr.read()[-2000:]}") from None
    assert "Running gRPC ModelServer at 127.0.0.1:" in line, line
    return process, line.strip().rsplit(" ", 1)[-1]


def test_kvlm_serve_process_predict_cli_and_graceful_shutdown(exported, tmp_path, examples, capsys):
    run_dir, version_dir = exported
    copy_version(version_dir, tmp_path / "models")
    (tmp_path / "models.config").write_text(
        "model_config_list { config { name: 'kvlm' base_path: 'models/kvlm' model_platform: 'tensorflow' } }\n"
    )
    # A 2 s batch timeout keeps a request in flight while SIGTERM arrives.
    (tmp_path / "batching.config").write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 2000000 }\n")
    process, target = _start_serve([
        "--model_config_file", str(tmp_path / "models.config"), "--enable_batching",
        "--batching_parameters_file", str(tmp_path / "batching.config"), "--file_system_poll_wait_seconds", "0",
    ])
    try:
        images, texts = examples
        image_file = tmp_path / "image.png"
        image_file.write_bytes(images[0])
        assert main(["predict", "--server", target, "--image", str(image_file), "--text", texts[0], "--top", "2"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == 2 and all(len(line.split("\t")) == 2 for line in printed)
        assert main(["predict", "--server", target, "--image", str(image_file), "--text", "q", "--model_name", "nope"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err

        client = PredictClient(target, timeout=60)
        assert client.status("kvlm") == [{"version": 1, "state": "AVAILABLE", "error_code": 0, "error_message": ""}]
        in_flight: list = []
        asker = threading.Thread(target=lambda: in_flight.append(client.ask("kvlm", images[:1], texts[:1])))
        asker.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        asker.join(timeout=60)
        assert in_flight and in_flight[0]["answer"].shape == (1,)  # finished despite the shutdown
        assert process.wait(timeout=60) == 0
        assert "Received SIGTERM: shutting down" in process.stderr.read()
        with pytest.raises(grpc.RpcError) as error:
            PredictClient(target, timeout=5).status("kvlm")
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return key, cert


def test_tls_and_bearer_token(exported, tmp_path, examples, certificate):
    from kvlm.serving.config import tls_from_files

    key, cert = certificate
    base = copy_version(exported[1], tmp_path / "models")
    options = ServerOptions(
        [ModelConfig("kvlm", base)], port=0, file_system_poll_wait_seconds=0,
        tls=tls_from_files(str(cert), str(key)), auth_token="s3cret",
    )
    images, texts = examples
    with Server(options) as server:
        target = f"127.0.0.1:{server.port}"
        with PredictClient(target, timeout=30, root_certificates=cert.read_bytes(), auth_token="s3cret") as client:
            assert client.ask("kvlm", images[:1], texts[:1])["answer"].shape == (1,)
        for token in (None, "wrong"):
            with PredictClient(target, timeout=30, root_certificates=cert.read_bytes(), auth_token=token) as client:
                with pytest.raises(grpc.RpcError) as error:
                    client.status("kvlm")
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with PredictClient(target, timeout=5, auth_token="s3cret") as plaintext:
            with pytest.raises(grpc.RpcError) as error:
                plaintext.status("kvlm")
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
