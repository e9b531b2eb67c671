"""The Open Inference Protocol's gRPC service, `inference.GRPCInferenceService`, on the gRPC port.

Requests are translated to the protocol's JSON objects and run by `kvlm.serving.open_inference`,
as the REST front end runs them; outputs always come back in `raw_output_contents` (what
Triton's clients read). Errors are the call's status with a message naming the problem.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from kvlm.serving import open_inference
from kvlm.serving.errors import ServingError, invalid
from kvlm.serving.health import Readiness
from kvlm.serving.open_inference_protos import METHODS, SERVICE, message_class
from kvlm.serving.service import InferenceService

# The typed contents field of each datatype (FP16 and BF16 travel only as raw bytes).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _version(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise invalid(f"A model version must be a number. Received: {text!r}")
    return int(text)


def _parameters(parameters) -> dict:
    """A protocol parameter map as `{name: bool | int | str}`."""
    values = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[name] = getattr(parameter, choice) if choice else None
    return values


def _request_object(request) -> tuple[dict, list[open_inference.Tensor]]:
    """A ModelInferRequest as the protocol's JSON object and its input tensors."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs.")
    tensors = []
    for index, tensor in enumerate(request.inputs):
        spec = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                "parameters": _parameters(tensor.parameters)}
        if raw:
            if tensor.HasField("contents"):
                raise invalid(f"Input '{tensor.name}' has contents while raw_input_contents is used.")
            tensors.append(open_inference.Tensor(spec, raw[index]))
            continue
        field = _CONTENTS.get(tensor.datatype)
        if field is not None:
            spec["data"] = list(getattr(tensor.contents, field))
        tensors.append(open_inference.Tensor(spec))
    message = {
        "id": request.id, "parameters": _parameters(request.parameters), "inputs": [t.spec for t in tensors],
        "outputs": [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs],
    }
    return message, tensors


class InferenceServicer:
    """ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer."""

    def __init__(self, service: InferenceService, readiness: Readiness):
        self.service = service
        self.readiness = readiness

    def ServerLive(self, request, context):
        return message_class("ServerLiveResponse")(live=True)

    def ServerReady(self, request, context):
        return message_class("ServerReadyResponse")(ready=self.readiness.server_ready())

    def ModelReady(self, request, context):
        ready = self._call(context, lambda: self.readiness.model_ready(request.name, _version(request.version)))
        return message_class("ModelReadyResponse")(ready=ready)

    def ServerMetadata(self, request, context):
        return json_format.ParseDict(open_inference.server_metadata(), message_class("ServerMetadataResponse")())

    def ModelMetadata(self, request, context):
        metadata = self._measured(context, "model_metadata", request.name, lambda: open_inference.model_metadata(
            self.service, request.name, _version(request.version)))
        return json_format.ParseDict(metadata, message_class("ModelMetadataResponse")())

    def ModelInfer(self, request, context):
        def infer():
            message, inputs = _request_object(request)
            return open_inference.infer(self.service, request.model_name, _version(request.model_version), message,
                                        inputs, context.time_remaining(), binary=True)

        response, outputs = self._measured(context, "model_infer", request.model_name, infer)
        reply = message_class("ModelInferResponse")(
            model_name=response["model_name"], model_version=response["model_version"], id=request.id)
        for output in outputs:
            reply.outputs.add(name=output.spec["name"], datatype=output.spec["datatype"], shape=output.spec["shape"])
            reply.raw_output_contents.append(output.raw)
        return reply

    def _measured(self, context, api: str, model_name: str, call):
        return self._call(context, lambda: self.service.measured(api, "GRPC", model_name, call))

    @staticmethod
    def _call(context, call):
        try:
            return call()
        except ServingError as error:
            context.abort(error.code, error.message)


def add_inference_servicer(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Registers `servicer`'s methods under `inference.GRPCInferenceService` on `server`."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=message_class(request).FromString,
            response_serializer=message_class(response).SerializeToString,
        )
        for name, (request, response) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
