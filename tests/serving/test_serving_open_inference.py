"""The Open Inference Protocol (KServe V2) over REST and gRPC, driven by Triton's own clients
(`tritonclient.http`, `tritonclient.grpc` and its generated stub) and a plain HTTP client against
real servers on 127.0.0.1: kvlm's export answers through the four APIs as it does through TF
Serving's gRPC Predict, TF Serving's `half_plus_two` gives 0.5 x + 2, and bad or hostile requests
get the protocol's status codes naming the problem."""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest

from hostile import huge_png
from test_serving_rest import grpc_outputs

pytestmark = pytest.mark.tensorflow_only

TIMEOUT = 30


def _http(server, path: str, body: bytes | None = None, headers: dict | None = None):
    """`(status, headers, body bytes)` of one call to the REST port (POST when there is a body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _post(server, path: str, message: dict, raw: bytes = b""):
    """`(status, parsed JSON)` of an infer request, under the binary extension when `raw` is given."""
    head = json.dumps(message).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))} if raw else {}
    status, _, body = _http(server, path, head + raw, headers)
    return status, json.loads(body)


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@pytest.fixture
def triton_grpc(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture
def triton(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.rest_port}", network_timeout=TIMEOUT)
    yield client
    client.close()


def test_tritonclient_reads_the_server_and_model_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("kvlm")
    server = triton.get_server_metadata()
    assert server["name"] == "kvlm" and "binary_tensor_data" in server["extensions"]
    metadata = triton.get_model_metadata("kvlm", "1")
    assert metadata["name"] == "kvlm" and metadata["versions"] == ["1"]
    assert metadata["platform"] == "tensorflow_savedmodel"
    assert metadata["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
                                  {"name": "text", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs["answer"] == ("BYTES", [-1]) and outputs["scores"][0] == "FP32" and len(outputs["scores"][1]) == 2
    logits = triton.get_model_metadata("kvlm", query_params={"signature_name": "logits"})
    assert [i["name"] for i in logits["inputs"]] == ["images", "token_ids"]


@pytest.mark.parametrize("binary_outputs", [True, False])
def test_tritonclient_infer_answers_as_tf_serving_grpc(triton, stub, examples, binary_outputs):
    """Raw image bytes as BYTES under the binary extension; outputs in binary or in JSON."""
    import tritonclient.http as httpclient

    images, texts = examples
    image_input = httpclient.InferInput("image_bytes", [4], "BYTES")
    image_input.set_data_from_numpy(np.array(images[:4], dtype=object))
    text_input = httpclient.InferInput("text", [4], "BYTES")
    text_input.set_data_from_numpy(np.array([t.encode() for t in texts[:4]], dtype=object), binary_data=False)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_outputs) for n in ("answer", "score", "scores")]
    result = triton.infer("kvlm", [image_input, text_input], outputs=outputs, request_id="7")
    expected = grpc_outputs(stub, images[:4], texts[:4])
    assert result.get_response()["id"] == "7" and result.get_response()["model_version"] == "1"
    answers = [a if isinstance(a, bytes) else a.encode() for a in result.as_numpy("answer")]  # JSON gives str
    assert answers == list(expected["answer"])
    np.testing.assert_allclose(result.as_numpy("score"), expected["score"], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), expected["scores"], rtol=1e-6)
    assert result.as_numpy("labels") is None  # only the outputs asked for


def test_four_apis_give_the_same_answers(server, stub, triton, triton_grpc, examples):
    """TF Serving's gRPC Predict and REST predict, and the Open Inference Protocol's REST and gRPC
    infer, on the same images and questions of one export."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from test_serving_rest import b64
    from rest_client import rest

    images, texts = examples
    expected = grpc_outputs(stub, images, texts)
    status, body = rest(server, "/v1/models/kvlm:predict",
                        {"inputs": {"image_bytes": [b64(i) for i in images], "text": texts}})
    assert status == 200, body
    answers = {"tf_serving_rest": (body["outputs"]["answer"], body["outputs"]["scores"])}
    for api, module, client in (("v2_rest", httpclient, triton), ("v2_grpc", grpcclient, triton_grpc)):
        inputs = [module.InferInput("image_bytes", [8], "BYTES"), module.InferInput("text", [8], "BYTES")]
        inputs[0].set_data_from_numpy(np.array(images, dtype=object))
        inputs[1].set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        result = client.infer("kvlm", inputs)
        answers[api] = ([a.decode() for a in result.as_numpy("answer")], result.as_numpy("scores"))
    for api, (answer, scores) in answers.items():
        assert answer == [a.decode() for a in expected["answer"]], api
        np.testing.assert_allclose(scores, expected["scores"], rtol=1e-6, err_msg=api)


def test_tritonclient_grpc_reads_metadata_and_probes(triton_grpc):
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready()
    assert triton_grpc.is_model_ready("kvlm") and triton_grpc.is_model_ready("kvlm", "1")
    assert not triton_grpc.is_model_ready("kvlm", "7")
    assert triton_grpc.get_server_metadata(as_json=True)["name"] == "kvlm"
    metadata = triton_grpc.get_model_metadata("kvlm", as_json=True)
    assert metadata["versions"] == ["1"] and metadata["inputs"][0] == {
        "name": "image_bytes", "datatype": "BYTES", "shape": ["-1"]}  # int64 prints as a string in JSON


def test_grpc_typed_contents_and_errors_on_half_plus_two(hp_server):
    """Tensors in `contents` (not raw) through Triton's generated stub; a bad request is
    INVALID_ARGUMENT and an unknown model NOT_FOUND, each naming the problem."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{hp_server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="half_plus_two_tf2", id="a")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[3])
        tensor.contents.fp32_contents.extend([1.0, 2.0, 5.0])
        response = stub.ModelInfer(request, timeout=TIMEOUT)
        assert (response.model_name, response.model_version, response.id) == ("half_plus_two_tf2", "123", "a")
        (output,) = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == ("y", "FP32", [3])
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), [2.5, 3.0, 4.5])

        tensor.shape[:] = [4]
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=TIMEOUT)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "3 values in 'data' for a shape of 4" in error.value.details()
        request.model_name = "nope"
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=TIMEOUT)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in error.value.details()


def test_plain_http_json_and_binary_give_half_plus_two(hp_server):
    """The TF1 graph in JSON (the serving/README example, byte for byte), the TF2 export in binary."""
    message = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 1], "data": [1.0, 2.0, 5.0]}]}
    status, _, body = _http(hp_server, "/v2/models/half_plus_two/infer", json.dumps(message).encode())
    assert status == 200, body
    assert body == (b'{"model_name":"half_plus_two","model_version":"123","outputs":[{"name":"y","datatype":"FP32",'
                    b'"shape":[3,1],"data":[2.5,3.0,4.5]}]}')

    raw = np.array([1.0, 4.0], "<f4").tobytes()
    message = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}],
               "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    head = json.dumps(message).encode()
    status, headers, body = _http(hp_server, "/v2/models/half_plus_two_tf2/versions/123/infer", head + raw,
                                  {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, body
    size = int(headers["Inference-Header-Content-Length"])
    (output,) = json.loads(body[:size])["outputs"]
    assert output == {"name": "y", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}
    np.testing.assert_array_equal(np.frombuffer(body[size:], "<f4"), [2.5, 4.0])


def _bad_requests(png: bytes) -> dict:
    """`case: (path, message, raw, HTTP status, words of the error)` for the kvlm export."""
    infer = "/v2/models/kvlm/infer"
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["q"]}

    def image(raw: bytes, shape=(1,), **fields):
        return {"name": "image_bytes", "datatype": "BYTES", "shape": list(shape),
                "parameters": {"binary_data_size": len(raw)}, **fields}

    one = _bytes_tensor([png])
    return {
        "unknown model": ("/v2/models/nope/infer", {"inputs": [text]}, b"", 404, "nope"),
        "unknown version": ("/v2/models/kvlm/versions/9/infer", {"inputs": [image(one), text]}, one, 404,
                            "version 9"),
        "missing input": (infer, {"inputs": [text]}, b"", 400, "takes ['image_bytes', 'text']"),
        "wrong datatype": (infer, {"inputs": [image(one), {**text, "datatype": "FP32"}]}, one, 400,
                           "must have datatype BYTES"),
        "count and shape differ": (infer, {"inputs": [image(one), {**text, "shape": [2]}]}, one, 400,
                                   "1 values in 'data' for a shape of 2"),
        "huge shape, little data": (infer, {"inputs": [image(one, shape=(10**12,)), text]}, one, 400,
                                    "1 elements for a shape of 1000000000000"),
        "batch mismatch": (infer, {"inputs": [image(_bytes_tensor([png, png]), shape=(2,)), text]},
                           _bytes_tensor([png, png]), 400, "same batch size"),
        "binary size beyond the body": (infer, {"inputs": [{**image(one), "parameters": {"binary_data_size": 10**9}},
                                                           text]}, one, 400, "binary_data_size 1000000000"),
        "bytes no input claims": (infer, {"inputs": [image(one), text]}, one + b"extra", 400, "5 bytes"),
        "element longer than the data": (infer, {"inputs": [image(struct.pack("<I", 10**6) + b"ab"), text]},
                                         struct.pack("<I", 10**6) + b"ab", 400, "claims 1000000 bytes"),
        "image bytes in JSON": (infer, {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                   "data": [1]}, text]}, b"", 400, "binary tensor data extension"),
        "unknown output": (infer, {"inputs": [image(one), text], "outputs": [{"name": "nope"}]}, one, 400,
                           "Unknown output(s) ['nope']"),
        "unknown signature": (infer, {"inputs": [image(one), text], "parameters": {"signature_name": "nope"}}, one,
                              404, "no signature 'nope'"),
        "corrupt image": (infer, {"inputs": [image(_bytes_tensor([b"\x00garbage"])), text]},
                          _bytes_tensor([b"\x00garbage"]), 400, "Unknown image file format"),
        "huge image": (infer, {"inputs": [image(_bytes_tensor([huge_png()])), text]},
                       _bytes_tensor([huge_png()]), 400, "above the server's limit"),
    }


@pytest.mark.parametrize("case", list(_bad_requests(b"")))
def test_bad_infer_request_gets_the_protocol_status_naming_the_problem(server, stub, examples, case):
    images, texts = examples
    path, message, raw, status, words = _bad_requests(images[0])[case]
    got, answer = _post(server, path, message, raw)
    assert (got, set(answer)) == (status, {"error"}), answer
    assert words in answer["error"]
    assert grpc_outputs(stub, images[:1], texts[:1])["answer"].shape == (1,)  # still serving


def test_malformed_bodies_are_400s(server):
    infer = "/v2/models/kvlm/infer"
    for body, headers, words in [
        (b"{not json", {}, "JSON Parse error"),
        (b"[1, 2]", {}, "must start with a JSON object"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "within the body's 2 bytes"),
        (json.dumps({"inputs": []}).encode(), {}, "non-empty list"),
    ]:
        status, _, answer = _http(server, infer, body, headers)
        assert status == 400 and words in json.loads(answer)["error"], answer
    assert _http(server, "/v2/models/nope")[0] == 404


def test_hostile_campaign_over_both_v2_apis(server, triton_grpc, stub, examples):
    """Eight concurrent 20000 x 20000 PNGs (0.4 MB each), four over V2 REST and four over V2 gRPC:
    each refused with INVALID_ARGUMENT / 400 before decoding, and the next good request answered."""
    from concurrent import futures

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    images, texts = examples
    hostile = huge_png()
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [texts[0]]}
    raw = _bytes_tensor([hostile])
    message = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                           "parameters": {"binary_data_size": len(raw)}}, text]}

    def over_grpc():
        inputs = [grpcclient.InferInput("image_bytes", [1], "BYTES"), grpcclient.InferInput("text", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([hostile], dtype=object))
        inputs[1].set_data_from_numpy(np.array([texts[0].encode()], dtype=object))
        try:
            triton_grpc.infer("kvlm", inputs, client_timeout=120)
        except InferenceServerException as error:
            return error.status(), error.message()
        return "answered", ""

    with futures.ThreadPoolExecutor(8) as pool:
        rest_calls = [pool.submit(_post, server, "/v2/models/kvlm/infer", message, raw) for _ in range(4)]
        grpc_calls = [pool.submit(over_grpc) for _ in range(4)]
        rest_results = [c.result() for c in rest_calls]
        grpc_results = [c.result() for c in grpc_calls]
    assert all(status == 400 and "above the server's limit" in body["error"] for status, body in rest_results)
    assert all(status == "StatusCode.INVALID_ARGUMENT" and "above the server's limit" in text
               for status, text in grpc_results), grpc_results
    assert grpc_outputs(stub, images[:1], texts[:1])["answer"].shape == (1,)
