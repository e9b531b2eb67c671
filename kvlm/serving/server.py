"""An embedded server speaking TF Serving's gRPC API (and its REST API with `rest_api_port`).

Implements every `tensorflow.serving.PredictionService` method (Predict, Classify,
Regress, MultiInference, GetModelMetadata) and `tensorflow.serving.ModelService`
(GetModelStatus, HandleReloadConfigRequest) with the generated stubs of
`tensorflow-serving-api`, so stock TF Serving clients work unchanged, the Open Inference
Protocol's `inference.GRPCInferenceService` (`kvlm.serving.open_inference_grpc`), and the gRPC
health-checking protocol (`grpc.health.v1.Health`, see `kvlm.serving.health`). Each Predict
response carries trailing metadata `kvlm-batch-size`: the number of examples in the
batch the request ran in (more than the request's own size when batching merged it).
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from concurrent import futures

import grpc
import tensorflow as tf
from grpc_health.v1 import health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from kvlm.serving.config import ServerOptions
from kvlm.serving.errors import ServingError
from kvlm.serving.health import HEALTH_METHOD_PREFIX, HealthService, Readiness
from kvlm.serving.metrics import Metrics
from kvlm.serving.models import ModelManager, set_thread_spinning
from kvlm.serving.open_inference_grpc import InferenceServicer, add_inference_servicer
from kvlm.serving.open_inference_protos import PROBE_METHODS
from kvlm.serving.service import InferenceService

logger = logging.getLogger(__name__)

BATCH_SIZE_METADATA = "kvlm-batch-size"


def _unary(api: str, method: str, model_name=lambda request: request.model_spec.name, timed: bool = True):
    """A gRPC handler running `InferenceService.<method>` (given the call's time left when
    `timed`): errors become the call's status."""

    def handler(self, request, context):
        service = self.service
        run = getattr(service, method)
        call = (lambda: run(request, context.time_remaining())) if timed else (lambda: run(request))
        try:
            return service.measured(api, "GRPC", model_name(request), call)
        except ServingError as error:
            context.abort(error.code, error.message)

    handler.__name__ = api
    return handler


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Every PredictionService method."""

    def __init__(self, service: InferenceService):
        self.service = service

    def Predict(self, request, context):
        service = self.service
        try:
            response, size = service.measured(
                "predict", "GRPC", request.model_spec.name,
                lambda: service.predict(request, context.time_remaining()),
            )
        except ServingError as error:
            context.abort(error.code, error.message)
        context.set_trailing_metadata(((BATCH_SIZE_METADATA, str(size)),))
        return response

    Classify = _unary("classify", "classify")
    Regress = _unary("regress", "regress")
    MultiInference = _unary(
        "multi_inference", "multi_inference",
        lambda request: request.tasks[0].model_spec.name if request.tasks else "",
    )
    GetModelMetadata = _unary("get_model_metadata", "metadata", timed=False)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, service: InferenceService):
        self.service = service

    GetModelStatus = _unary("get_model_status", "status", timed=False)
    HandleReloadConfigRequest = _unary("reload_config", "reload", model_name=lambda request: "", timed=False)


class _TokenAuth(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` metadata (UNAUTHENTICATED), health
    checks and the Open Inference Protocol's probes excepted."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Missing or wrong bearer token in 'authorization' metadata.")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_METHOD_PREFIX) or method in PROBE_METHODS:
            return continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and hmac.compare_digest(str(value).encode(), self._expected):
                return continuation(handler_call_details)
        return self._deny


class Server:
    """Loads the configured models and serves them over gRPC.

    Example:
        >>> server = Server(ServerOptions([ModelConfig("kvlm", Path("saved_models/kvlm"))], port=0))
        >>> port = server.start()
        >>> ...
        >>> server.stop()
    """

    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.manager = ModelManager(
            options.models, options.batching, options.file_system_poll_wait_seconds, self.metrics
        )
        self.service = InferenceService(self.manager, self.metrics, options.max_image_pixels, options.max_decode_bytes)
        self.readiness = Readiness(self.manager)
        self.health: HealthService | None = None
        self.port: int | None = None
        self.rest_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._rest = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Loads the models, opens the port and returns it (useful with `port=0`)."""
        options = self.options
        self.manager.start()
        self.health = HealthService(self.readiness)
        self.manager.listeners.append(self.health.update)
        interceptors = [_TokenAuth(options.auth_token)] if options.auth_token else []
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", options.max_message_bytes),
                ("grpc.max_send_message_length", options.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(self.service), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.service), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        add_inference_servicer(InferenceServicer(self.service, self.readiness), self._grpc)
        address = f"{options.host}:{options.port}"
        if options.tls:
            tls = options.tls
            credentials = grpc.ssl_server_credentials(
                [(tls.server_key, tls.server_cert)],
                root_certificates=tls.custom_ca,
                require_client_auth=tls.client_verify,
            )
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if not self.port:
            self.manager.close()
            raise ValueError(f"Could not bind {address}: is the port in use?")
        self._grpc.start()
        logger.info("Running gRPC ModelServer at %s:%d%s", options.host, self.port, " (TLS)" if options.tls else "")
        if options.rest_api_port is not None:
            from kvlm.serving.rest import RestServer

            self._rest = RestServer(self.service, self.readiness, options)
            try:
                self.rest_port = self._rest.start()
            except OSError as error:
                self._grpc.stop(0)
                self.manager.close()
                raise ValueError(f"Could not bind the REST API at {self._rest.host}:{options.rest_api_port}: {error}") from None
            logger.info("Exporting HTTP/REST API at %s:%d%s", self._rest.host, self.rest_port,
                        f" (Prometheus metrics at {options.prometheus_path})" if options.prometheus_path else "")
        return self.port

    def stats(self) -> dict:
        """Batching statistics by model, version and signature."""
        return self.manager.stats()

    def stop(self, grace: float | None = None) -> None:
        """Reports not ready, stops taking calls, lets in-flight ones finish (up to `grace`
        seconds), unloads models."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.readiness.stopping.set()
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        if self._rest is not None:
            self._rest.stop(grace)
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        self.manager.close()
        logger.info("Server stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until `stop` has been called; returns whether it was."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def configure_tensorflow(intra_op: int = 0, inter_op: int = 0, thread_spinning: bool = False) -> None:
    """Sets TensorFlow's thread pools (0 = TensorFlow's default) and whether their idle threads
    spin (`kvlm.serving.models.set_thread_spinning`); call before loading."""
    set_thread_spinning(thread_spinning)
    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def serve(options: ServerOptions) -> int:
    """Runs a server until SIGTERM or SIGINT, then shuts down gracefully; returns 0."""
    server = Server(options)
    requested = threading.Event()

    def on_signal(signum, frame):
        logger.info("Received %s: shutting down", signal.Signals(signum).name)
        requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(f"Running gRPC ModelServer at {options.host}:{server.port}", flush=True)
        if server.rest_port is not None:
            print(f"Exporting HTTP/REST API at {options.rest_host}:{server.rest_port}", flush=True)
        while not requested.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
