"""An embedded gRPC server speaking TF Serving's API.

Implements `tensorflow.serving.PredictionService` (Predict, GetModelMetadata) and
`tensorflow.serving.ModelService` (GetModelStatus) with the generated stubs of
`tensorflow-serving-api`, so stock TF Serving clients work unchanged. Each Predict
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
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from kvlm.serving.config import ServerOptions
from kvlm.serving.errors import ServingError, invalid
from kvlm.serving.models import ModelManager
from kvlm.serving.tensors import check_inputs, fill_tensor_proto

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
BATCH_SIZE_METADATA = "kvlm-batch-size"


def _version_request(spec) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress and MultiInference answer UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request, context):
        try:
            response, size = self.predict(request, context.time_remaining())
        except ServingError as error:
            context.abort(error.code, error.message)
        context.set_trailing_metadata(((BATCH_SIZE_METADATA, str(size)),))
        return response

    def predict(self, request: predict_pb2.PredictRequest, timeout: float | None = None):
        """Runs one Predict request; returns `(response, batch_size)` or raises `ServingError`."""
        spec = request.model_spec
        loaded = self.manager.model(spec.name).resolve(*_version_request(spec))
        signature = loaded.signature(spec.signature_name or DEFAULT_SIGNATURE)
        arrays = check_inputs(request.inputs, signature.inputs)
        wanted = list(request.output_filter) or list(signature.outputs)
        unknown = sorted(set(wanted) - set(signature.outputs))
        if unknown:
            raise invalid(f"Unknown output(s) {unknown} in output_filter; the signature returns {sorted(signature.outputs)}.")
        outputs, size = loaded.predict(signature, arrays, timeout)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = signature.name
        for name in wanted:
            fill_tensor_proto(response.outputs[name], outputs[name])
        return response, size

    def GetModelMetadata(self, request, context):
        try:
            return self.metadata(request)
        except ServingError as error:
            context.abort(error.code, error.message)

    def metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest):
        fields = set(request.metadata_field)
        if fields != {"signature_def"}:
            raise invalid(f"metadata_field must be ['signature_def'], got {sorted(fields)}.")
        spec = request.model_spec
        loaded = self.manager.model(spec.name).resolve(*_version_request(spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = loaded.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in loaded.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signature_map)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus; HandleReloadConfigRequest answers UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        try:
            return self.status(request)
        except ServingError as error:
            context.abort(error.code, error.message)

    def status(self, request: get_model_status_pb2.GetModelStatusRequest):
        model = self.manager.model(request.model_spec.name)
        version, label = _version_request(request.model_spec)
        if label:
            version = model.resolve(label=label).version
        statuses = dict(model.status)
        if version is not None:
            if version not in statuses:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Model '{model.config.name}' has no version {version}; known versions: {sorted(statuses)}.",
                )
            statuses = {version: statuses[version]}
        if not statuses:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Model '{model.config.name}' has no versions yet (looking in {model.config.base_path}).",
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, status in sorted(statuses.items()):
            entry = response.model_version_status.add(version=number, state=status.state)
            entry.status.error_code = status.error_code.value[0]
            entry.status.error_message = status.error_message
        return response


class _TokenAuth(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` metadata (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Missing or wrong bearer token in 'authorization' metadata.")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
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
        self.manager = ModelManager(options.models, options.batching, options.file_system_poll_wait_seconds)
        self.port: int | None = None
        self._grpc: grpc.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> int:
        """Loads the models, opens the port and returns it (useful with `port=0`)."""
        options = self.options
        self.manager.start()
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
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(self.manager), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.manager), self._grpc)
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
        return self.port

    def stats(self) -> dict:
        """Batching statistics by model, version and signature."""
        return self.manager.stats()

    def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish (up to `grace` seconds), unloads models."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.options.shutdown_grace_seconds if grace is None else grace
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


def configure_tensorflow(intra_op: int = 0, inter_op: int = 0) -> None:
    """Sets TensorFlow's thread pools (0 = TensorFlow's default); call before loading."""
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
        while not requested.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
