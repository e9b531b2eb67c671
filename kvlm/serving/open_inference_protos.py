"""The Open Inference Protocol's gRPC messages (package `inference`, service `GRPCInferenceService`).

The messages are built from their field tables into a private descriptor pool, not generated
into the default one: a process may hold another copy of the same protocol (tritonclient's,
KServe's), and two copies of one package cannot share a pool. Field names and numbers are the
protocol's, so any client of it (Triton's, KServe's, one generated from its `.proto`) speaks
to these messages on the wire.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
# The methods a health probe calls, which need no bearer token.
PROBE_METHODS = tuple(f"/{SERVICE}/{m}" for m in ("ServerLive", "ServerReady", "ModelReady"))

_Field = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bool": _Field.TYPE_BOOL, "string": _Field.TYPE_STRING, "bytes": _Field.TYPE_BYTES, "int32": _Field.TYPE_INT32,
    "int64": _Field.TYPE_INT64, "uint32": _Field.TYPE_UINT32, "uint64": _Field.TYPE_UINT64,
    "float": _Field.TYPE_FLOAT, "double": _Field.TYPE_DOUBLE,
}
_PARAMETERS = "map InferParameter"

# Each message's fields as (name, number, type): a scalar, a message of this package, "repeated T"
# or "map T" (a string-keyed map). Nested messages are named Outer.Inner.
MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "repeated string")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse": [
        ("name", 1, "string"), ("versions", 2, "repeated string"), ("platform", 3, "string"),
        ("inputs", 4, "repeated ModelMetadataResponse.TensorMetadata"),
        ("outputs", 5, "repeated ModelMetadataResponse.TensorMetadata"),
    ],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string"), ("datatype", 2, "string"),
                                             ("shape", 3, "repeated int64")],
    "ModelInferRequest": [
        ("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
        ("parameters", 4, _PARAMETERS), ("inputs", 5, "repeated ModelInferRequest.InferInputTensor"),
        ("outputs", 6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
        ("raw_input_contents", 7, "repeated bytes"),
    ],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "repeated int64"),
        ("parameters", 4, _PARAMETERS), ("contents", 5, "InferTensorContents"),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string"), ("parameters", 2, _PARAMETERS)],
    "ModelInferResponse": [
        ("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
        ("parameters", 4, _PARAMETERS), ("outputs", 5, "repeated ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, "repeated bytes"),
    ],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "repeated int64"),
        ("parameters", 4, _PARAMETERS), ("contents", 5, "InferTensorContents"),
    ],
    # One of bool_param, int64_param, string_param (the oneof `parameter_choice`).
    "InferParameter": [("bool_param", 1, "bool"), ("int64_param", 2, "int64"), ("string_param", 3, "string")],
    "InferTensorContents": [
        ("bool_contents", 1, "repeated bool"), ("int_contents", 2, "repeated int32"),
        ("int64_contents", 3, "repeated int64"), ("uint_contents", 4, "repeated uint32"),
        ("uint64_contents", 5, "repeated uint64"), ("fp32_contents", 6, "repeated float"),
        ("fp64_contents", 7, "repeated double"), ("bytes_contents", 8, "repeated bytes"),
    ],
}
ONEOFS = {"InferParameter": "parameter_choice"}
# The service's methods: name -> (request, response).
METHODS = {name: (f"{name}Request", f"{name}Response") for name in
           ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")}


def _add_field(message: descriptor_pb2.DescriptorProto, scope: str, name: str, number: int, kind: str) -> None:
    """Adds field `name` to `message`, whose full name within the package is `scope`."""
    if kind.startswith("map "):  # a repeated nested `<Name>Entry {key = 1; value = 2}` marked map_entry
        entry = message.nested_type.add(name=f"{name.title().replace('_', '')}Entry")
        entry.options.map_entry = True
        _add_field(entry, f"{scope}.{entry.name}", "key", 1, "string")
        _add_field(entry, f"{scope}.{entry.name}", "value", 2, kind[4:])
        message.field.add(name=name, number=number, label=_Field.LABEL_REPEATED, type=_Field.TYPE_MESSAGE,
                          type_name=f".{PACKAGE}.{scope}.{entry.name}")
        return
    label = _Field.LABEL_OPTIONAL
    if kind.startswith("repeated "):
        label, kind = _Field.LABEL_REPEATED, kind[9:]
    field = message.field.add(name=name, number=number, label=label)
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type, field.type_name = _Field.TYPE_MESSAGE, f".{PACKAGE}.{kind}"


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="kvlm/open_inference.proto", package=PACKAGE, syntax="proto3")
    built: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full_name, fields in MESSAGES.items():
        outer, _, inner = full_name.rpartition(".")
        message = (built[outer].nested_type if outer else file.message_type).add(name=inner)
        built[full_name] = message
        for name, number, kind in fields:
            _add_field(message, full_name, name, number, kind)
        if full_name in ONEOFS:
            message.oneof_decl.add(name=ONEOFS[full_name])
            for field in message.field:
                field.oneof_index = 0
    service = file.service.add(name=SERVICE.rpartition(".")[2])
    for name, (request, response) in METHODS.items():
        service.method.add(name=name, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}")
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def message_class(name: str) -> type:
    """The message class of `name` (e.g. `ModelInferRequest`, `ModelInferRequest.InferInputTensor`)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
