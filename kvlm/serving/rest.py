"""TF Serving's REST API (aiohttp), on the same `InferenceService` as the gRPC server.

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            model status
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   model metadata
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict|classify|regress
    GET  {prometheus path}                                       metrics (with a monitoring config)
    GET  /v2/health/live, /v2/health/ready                       probes (Open Inference Protocol)
    GET  /v2/models/{name}[/versions/{v}]/ready                  whether a model can answer
    GET  /v2                                                     server metadata (Open Inference Protocol)
    GET  /v2/models/{name}[/versions/{v}]                        model metadata
    POST /v2/models/{name}[/versions/{v}]/infer                  inference (JSON or binary tensor data)

A probe's answer is its status code, with an empty body: 200 for yes, 400 for no
(`kvlm.serving.health`); the health endpoints need no bearer token.

Under the binary tensor data extension a body is the JSON object, `Inference-Header-Content-Length`
bytes long, followed by the tensors' raw bytes (`kvlm.serving.open_inference`).

Errors are `{"error": "..."}` with TF Serving's HTTP codes (400 for a bad request,
404 for an unknown model or path, 429 when a limit is reached, ...). The server
runs its own event loop in a thread; model calls run in a thread pool.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import ssl
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    regression_pb2,
)

from kvlm.serving.config import ServerOptions, TLSConfig
from kvlm.serving.errors import ServingError, invalid
from kvlm.serving import open_inference
from kvlm.serving.health import Readiness
from kvlm.serving.json_tensors import fill_input, float_json, request_arrays, response_json
from kvlm.serving.metrics import CONTENT_TYPE
from kvlm.serving.service import DEFAULT_SIGNATURE, InferenceService
from kvlm.serving.tensors import check_arrays

logger = logging.getLogger(__name__)

_PATH = re.compile(
    r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?"
)
# TF Serving's mapping of status codes to HTTP (http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}
# The binary tensor data extension's header: the length of the JSON object that starts the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
_API = {None: "get_model_status", "metadata": "get_model_metadata", "predict": "predict",
        "classify": "classify", "regress": "regress"}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _fill_spec(spec, match: re.Match, signature_name: str = "") -> None:
    spec.name = match["name"]
    if match["version"]:
        spec.version.value = int(match["version"])
    elif match["label"]:
        spec.version_label = match["label"]
    if signature_name:
        spec.signature_name = signature_name


def ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server TLS context from PEM contents (client certificates required with `client_verify`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(tls.server_cert)
        key.write_bytes(tls.server_key)
        context.load_cert_chain(cert, key)
    if tls.custom_ca:
        context.load_verify_locations(cadata=tls.custom_ca.decode())
    if tls.client_verify:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class RestHandlers:
    """The request handlers: JSON in, `InferenceService` call in a worker thread, JSON out."""

    def __init__(self, service: InferenceService, readiness: Readiness, options: ServerOptions):
        self.service = service
        self.readiness = readiness
        self.options = options
        self.timeout = options.rest_api_timeout_seconds
        self._pool = futures.ThreadPoolExecutor(options.grpc_max_threads, thread_name_prefix="rest")
        self._expected = f"Bearer {options.auth_token}".encode() if options.auth_token else None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_message_bytes, middlewares=[self._errors])
        if self.options.prometheus_path:
            app.router.add_get(self.options.prometheus_path, self.metrics)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/models/{name}/ready", self.model_ready)
        app.router.add_get(r"/v2/models/{name}/versions/{version:\d+}/ready", self.model_ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/models/{name}", self.model_metadata)
        app.router.add_get(r"/v2/models/{name}/versions/{version:\d+}", self.model_metadata)
        app.router.add_post("/v2/models/{name}/infer", self.infer)
        app.router.add_post(r"/v2/models/{name}/versions/{version:\d+}/infer", self.infer)
        app.router.add_route("*", "/{tail:.*}", self.models)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge as error:
            return _error(413, f"The request body is larger than the server's limit ({error.max_size} bytes, "
                               f"--max_message_bytes).")
        except web.HTTPException as error:
            return _error(error.status, error.reason)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.service.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.readiness.server_ready() else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        version = request.match_info.get("version")
        try:
            ready = self.readiness.model_ready(request.match_info["name"], int(version) if version else None)
        except ServingError as error:
            return _error(HTTP_STATUS.get(error.code, 500), error.message)
        return web.Response(status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return self._denied(request) or web.json_response(open_inference.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        return await self._v2(request, "model_metadata", lambda name, version: web.json_response(
            open_inference.model_metadata(self.service, name, version, request.query.get("signature_name", ""))))

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not (header.isdigit() and int(header) <= len(body)):
            return _error(400, f"{HEADER_LENGTH} must be a byte count within the body's {len(body)} bytes. "
                               f"Received: {header!r}")
        size = len(body) if header is None else int(header)
        try:
            message = json.loads(body[:size])
        except (ValueError, UnicodeDecodeError) as error:
            return _error(400, f"JSON Parse error: {error}")
        if not isinstance(message, dict):
            return _error(400, "The request body must start with a JSON object.")

        def call(name: str, version: int | None) -> web.Response:
            inputs = open_inference.binary_inputs(message, body[size:])
            response, outputs = open_inference.infer(self.service, name, version, message, inputs, self.timeout)
            head = json.dumps(response, separators=(",", ":")).encode()
            raw = [t.raw for t in outputs if t.raw is not None]
            if not raw:
                return web.Response(body=head, content_type="application/json")
            return web.Response(body=b"".join([head, *raw]), content_type="application/octet-stream",
                                headers={HEADER_LENGTH: str(len(head))})

        return await self._v2(request, "model_infer", call)

    async def _v2(self, request: web.Request, api: str, call) -> web.Response:
        """Runs `call(name, version)` for a `/v2/models/{name}[/versions/{version}]` path in a
        worker thread, measured; a `ServingError` becomes its HTTP status and `{"error": ...}`."""
        denied = self._denied(request)
        if denied is not None:
            return denied
        name, version = request.match_info["name"], request.match_info.get("version")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self.service.measured, api, "REST", name,
                                              lambda: call(name, int(version) if version else None))
        except ServingError as error:
            return _error(HTTP_STATUS.get(error.code, 500), error.message)

    def _denied(self, request: web.Request) -> web.Response | None:
        """The 401 answer to a request without the bearer token, when one is configured."""
        if self._expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                return _error(401, "Missing or wrong bearer token in the 'Authorization' header.")
        return None

    async def models(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        match = _PATH.fullmatch(request.path)
        verb = match and match["verb"]
        if match is None or (request.method == "POST") != bool(verb) or request.method not in ("GET", "POST"):
            return _error(404, f"Malformed request: {request.method} {request.path}")
        body = None
        if verb:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError) as error:
                return _error(400, f"JSON Parse error: {error}")
            if not isinstance(body, dict):
                return _error(400, "The request body must be a JSON object.")
        api = _API["metadata" if match["metadata"] else verb]
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                self._pool, self.service.measured, api, "REST", match["name"], lambda: self._call(api, match, body)
            )
        except ServingError as error:
            return _error(HTTP_STATUS.get(error.code, 500), error.message)
        return web.json_response(result, dumps=lambda value: json.dumps(value, separators=(",", ":")))

    def _call(self, api: str, match: re.Match, body: dict | None) -> dict:
        service = self.service
        if api == "get_model_status":
            request = get_model_status_pb2.GetModelStatusRequest()
            _fill_spec(request.model_spec, match)
            return json_format.MessageToDict(service.status(request), preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        if api == "get_model_metadata":
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            _fill_spec(request.model_spec, match)
            response = service.metadata(request)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
            return {
                "model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True,
                                                        always_print_fields_with_no_presence=True),
                # TF Serving prints every field, its empty `defaults` maps and `unknown_rank: false` included.
                "metadata": {"signature_def": json_format.MessageToDict(
                    signatures, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)},
            }
        signature_name = body.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid("'signature_name' must be a string.")
        if api == "predict":
            return self._predict(match, body, signature_name)
        if api == "classify":
            request = classification_pb2.ClassificationRequest()
            _fill_spec(request.model_spec, match, signature_name)
            fill_input(request.input, body)
            result = service.classify(request, self.timeout).result
            return {"results": [[[c.label, float_json(c.score)] for c in row.classes]
                                for row in result.classifications]}
        request = regression_pb2.RegressionRequest()
        _fill_spec(request.model_spec, match, signature_name)
        fill_input(request.input, body)
        result = service.regress(request, self.timeout).result
        return {"results": [float_json(r.value) for r in result.regressions]}

    def _predict(self, match: re.Match, body: dict, signature_name: str) -> dict:
        version = int(match["version"]) if match["version"] else None
        with self.service.manager.model(match["name"]).use(version, match["label"]) as loaded:
            signature = loaded.signature(signature_name or DEFAULT_SIGNATURE)
            arrays, row = request_arrays(body, signature.inputs)
            outputs, _ = self.service.predict_arrays(
                loaded, signature, check_arrays(arrays, signature.inputs), timeout=self.timeout
            )
        return response_json(outputs, row)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RestServer:
    """Runs `RestHandlers` on `host:port` in a thread with its own event loop."""

    def __init__(self, service: InferenceService, readiness: Readiness, options: ServerOptions):
        self.options = options
        self.host = options.rest_host
        self.handlers = RestHandlers(service, readiness, options)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="rest", daemon=True)

    def start(self) -> int:
        """Binds the port and returns it (useful with port 0)."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> int:
        self._runner = web.AppRunner(self.handlers.application(), access_log=None, handle_signals=False)
        await self._runner.setup()
        context = ssl_context(self.options.tls) if self.options.tls else None
        site = web.TCPSite(self._runner, self.host, self.options.rest_api_port, ssl_context=context,
                           reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        return site._server.sockets[0].getsockname()[1]

    def stop(self, grace: float = 5.0) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.shutdown(), self._loop).result(grace + 5)
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(grace + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=grace + 5)
        self.handlers.close()
