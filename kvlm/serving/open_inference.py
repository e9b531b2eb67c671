"""The Open Inference Protocol (KServe V2) on the same model manager as TF Serving's APIs.

Server metadata, model metadata and inference, independent of the transport: requests and
responses are the protocol's JSON objects (the REST front end parses and writes them, with
the binary tensor data extension's raw bytes beside them). A request may choose the
signature with the parameter `signature_name` (default `serving_default`); tensors are
checked against it as strictly as TF Serving's Predict checks them, before any large
allocation, and every error is a `ServingError` that the front end maps to the protocol's
status codes. The parameter `experts` (comma-separated expert names; empty: the base only) runs
a model with experts installed on its `choose_experts` signature, restricted to those experts.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

import kvlm
from kvlm.export.names import CHOOSE_EXPERTS_SIGNATURE_NAME, EXPERTS_INPUT
from kvlm.serving.errors import invalid
from kvlm.serving.models import Signature
from kvlm.serving.service import DEFAULT_SIGNATURE, InferenceService
from kvlm.serving.tensors import InputSpec, check_arrays, check_dimensions

SERVER_NAME = "kvlm"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "tensorflow_savedmodel"
# The protocol's tensor data types by TensorFlow dtype.
DATATYPES = {
    types_pb2.DT_BOOL: "BOOL", types_pb2.DT_UINT8: "UINT8", types_pb2.DT_UINT16: "UINT16",
    types_pb2.DT_UINT32: "UINT32", types_pb2.DT_UINT64: "UINT64", types_pb2.DT_INT8: "INT8",
    types_pb2.DT_INT16: "INT16", types_pb2.DT_INT32: "INT32", types_pb2.DT_INT64: "INT64",
    types_pb2.DT_HALF: "FP16", types_pb2.DT_FLOAT: "FP32", types_pb2.DT_DOUBLE: "FP64",
    types_pb2.DT_BFLOAT16: "BF16", types_pb2.DT_STRING: "BYTES",
}
_LENGTH = struct.Struct("<I")  # the 4-byte little-endian length before each BYTES element


@dataclass
class Tensor:
    """One input or output tensor: its JSON object (name, datatype, shape, data or parameters)
    and, under the binary extension, its raw bytes."""

    spec: dict
    raw: bytes | None = None


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": kvlm.__version__, "extensions": EXTENSIONS}


def datatype(dtype: int) -> str:
    """The protocol's name of a TensorFlow dtype enum."""
    if dtype not in DATATYPES:
        raise invalid(f"The Open Inference Protocol has no data type for {types_pb2.DataType.Name(dtype)}.")
    return DATATYPES[dtype]


def _tensor_metadata(name: str, dtype: int, shape: Sequence[int | None] | None) -> dict:
    """`{name, datatype, shape}`, -1 for a dimension of any size (and `[-1]` for any rank)."""
    return {"name": name, "datatype": datatype(dtype), "shape": [-1 if d is None else d for d in (shape or [None])]}


def model_metadata(service: InferenceService, name: str, version: int | None, signature_name: str = "") -> dict:
    """A model's versions and the inputs and outputs of a signature (`serving_default` by default)."""
    model = service.manager.model(name)
    loaded = model.resolve(version)
    signature = loaded.signature(signature_name or DEFAULT_SIGNATURE)
    return {
        "name": name,
        "versions": [str(v) for v in sorted(model.versions)],
        "platform": PLATFORM,
        "inputs": [_tensor_metadata(n, s.dtype, s.shape) for n, s in sorted(signature.inputs.items())],
        "outputs": [_tensor_metadata(n, s.dtype.as_datatype_enum, None if s.shape.rank is None else s.shape.as_list())
                    for n, s in sorted(signature.outputs.items())],
    }


def infer(service: InferenceService, name: str, version: int | None, request: dict, inputs: Sequence[Tensor],
          timeout: float | None, binary: bool | None = None) -> tuple[dict, list[Tensor]]:
    """Runs one inference request; returns the response object and its output tensors (those
    asked for in binary, or all with `binary=True`, carry `raw` bytes and a `binary_data_size`
    parameter instead of data)."""
    parameters = _parameters(request, "the request")
    signature_name = parameters.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid(f"The parameter 'signature_name' must be a string. Received: {signature_name!r}")
    chosen = parameters.get(EXPERTS_INPUT)
    if chosen is not None and not isinstance(chosen, str):
        raise invalid(f"The parameter '{EXPERTS_INPUT}' must be a string of comma-separated expert names. "
                      f"Received: {chosen!r}")
    binary_default = bool(parameters.get("binary_data_output", False)) if binary is None else binary
    wanted = _requested_outputs(request, binary_default)
    with service.manager.model(name).use(version) as loaded:
        default = DEFAULT_SIGNATURE if chosen is None else CHOOSE_EXPERTS_SIGNATURE_NAME
        signature = loaded.signature(signature_name or default)
        arrays = _input_arrays(inputs, signature, chosen)
        outputs, _ = service.predict_arrays(loaded, signature, check_arrays(arrays, signature.inputs),
                                            list(wanted) or None, timeout)
    response = {"model_name": name, "model_version": str(loaded.version), "outputs": []}
    if "id" in request:
        response["id"] = request["id"]
    tensors = [_output(output, value, binary if binary is not None else wanted.get(output, binary_default))
               for output, value in outputs.items()]
    response["outputs"] = [t.spec for t in tensors]
    return response, tensors


def _parameters(owner: dict, what: str) -> dict:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise invalid(f"'parameters' of {what} must be an object. Received: {parameters!r}")
    return parameters


def _requested_outputs(request: dict, binary_default: bool) -> dict[str, bool]:
    """The outputs a request names, each with whether it wants binary data (empty: all outputs)."""
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise invalid(f"'outputs' must be a list of objects with a 'name'. Received: {outputs!r}")
    wanted = {}
    for output in outputs:
        binary = _parameters(output, f"output '{output['name']}'").get("binary_data", binary_default)
        wanted[output["name"]] = bool(binary)
    return wanted


def _input_arrays(inputs: Sequence[Tensor], signature: Signature, chosen: str | None) -> dict[str, np.ndarray]:
    """The request's inputs as arrays; with `chosen` experts, the signature's `experts` input is
    that string for every example."""
    specs = dict(signature.inputs)
    if chosen is not None:
        if EXPERTS_INPUT not in specs:
            raise invalid(f"The parameter '{EXPERTS_INPUT}' needs a model with experts installed: signature "
                          f"'{signature.name}' takes no '{EXPERTS_INPUT}' input.")
        del specs[EXPERTS_INPUT]
    names = [t.spec.get("name") for t in inputs]
    if len(set(names)) != len(names) or set(names) != set(specs):
        raise invalid(f"The request's inputs are {names}; the signature '{signature.name}' takes {sorted(specs)}"
                      f"{'' if chosen is None else f' (and {EXPERTS_INPUT!r} from the parameter)'}.")
    arrays = {t.spec["name"]: _input_array(t, specs[t.spec["name"]]) for t in inputs}
    if chosen is not None:
        rows = next((a.shape[0] for a in arrays.values() if a.ndim), 1)
        arrays[EXPERTS_INPUT] = np.array([chosen.encode("utf-8")] * rows, dtype=object)
    return arrays


def _input_array(tensor: Tensor, spec: InputSpec) -> np.ndarray:
    """One input as an array of its spec's dtype, its datatype, shape and element count checked
    before anything of the shape's size is allocated."""
    name, given = spec.name, tensor.spec
    expected = datatype(spec.dtype)
    if given.get("datatype") != expected:
        raise invalid(f"Input '{name}' must have datatype {expected}. Received: {given.get('datatype')!r}")
    shape = given.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise invalid(f"Input '{name}' needs a 'shape' of non-negative integers. Received: {shape!r}")
    dims = tuple(shape)
    check_dimensions(dims, spec)
    count = math.prod(dims)
    if tensor.raw is not None:
        if "data" in given:
            raise invalid(f"Input '{name}' has both 'data' and binary data.")
        values = _from_binary(tensor.raw, spec, count)
    else:
        if "data" not in given:
            raise invalid(f"Input '{name}' has no 'data' and no binary data.")
        values = _from_json(given["data"], spec, count)
    return values.reshape(dims)


def _flatten(data) -> list:
    if isinstance(data, list):
        return [item for value in data for item in _flatten(value)]
    return [data]


def _from_json(data, spec: InputSpec, count: int) -> np.ndarray:
    """`data` (nested lists, or a flat list of gRPC contents) as an array of the spec's dtype."""
    values = _flatten(data)
    if len(values) != count:
        raise invalid(f"Input '{spec.name}' has {len(values)} values in 'data' for a shape of {count} elements.")
    if spec.dtype == types_pb2.DT_STRING:
        if not all(isinstance(v, (str, bytes)) for v in values):
            raise invalid(f"Input '{spec.name}' (BYTES) takes strings in JSON; send raw bytes such as image "
                          "files with the binary tensor data extension.")
        return np.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=object)
    kind = bool if spec.dtype == types_pb2.DT_BOOL else (int, float)
    if not all(isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) for v in values):
        raise invalid(f"Input '{spec.name}' ({datatype(spec.dtype)}) takes "
                      f"{'booleans' if kind is bool else 'numbers'} in 'data'.")
    try:
        return np.array(values, dtype=spec.numpy_dtype)
    except (ValueError, OverflowError) as error:
        raise invalid(f"Input '{spec.name}' does not fit {datatype(spec.dtype)}: {error}") from None


def _from_binary(raw: bytes, spec: InputSpec, count: int) -> np.ndarray:
    if spec.dtype != types_pb2.DT_STRING:
        if len(raw) != count * spec.item_size:
            raise invalid(f"Input '{spec.name}' has {len(raw)} bytes of binary data; its shape needs "
                          f"{count} x {spec.item_size} = {count * spec.item_size}.")
        return np.frombuffer(raw, dtype=spec.numpy_dtype.newbyteorder("<")).astype(spec.numpy_dtype)
    values, offset = [], 0
    while offset < len(raw) and len(values) < count:
        if offset + _LENGTH.size > len(raw):
            raise invalid(f"Input '{spec.name}': binary data ends inside an element's 4-byte length.")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise invalid(f"Input '{spec.name}': an element claims {size} bytes; {len(raw) - offset} are left.")
        values.append(raw[offset:offset + size])
        offset += size
    if len(values) != count or offset != len(raw):
        raise invalid(f"Input '{spec.name}': binary data holds {len(values)} elements"
                      f"{' and trailing bytes' if offset != len(raw) else ''} for a shape of {count} elements.")
    return np.array(values, dtype=object)


def _output(name: str, value: np.ndarray, binary: bool) -> Tensor:
    array = np.asarray(value)
    is_bytes = array.dtype == object or array.dtype.kind in "SU"
    kind = "BYTES" if is_bytes else datatype(tf.as_dtype(array.dtype).as_datatype_enum)
    spec = {"name": name, "datatype": kind, "shape": list(array.shape)}
    elements = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel()] if is_bytes else None
    if binary:
        raw = (b"".join(_LENGTH.pack(len(e)) + e for e in elements) if is_bytes
               else np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
        spec["parameters"] = {"binary_data_size": len(raw)}
        return Tensor(spec, raw)
    if is_bytes:
        try:
            spec["data"] = [e.decode("utf-8") for e in elements]
        except UnicodeDecodeError:
            raise invalid(f"Output '{name}' holds bytes that are not UTF-8: ask for it with "
                          "'binary_data': true.") from None
    elif array.dtype.kind == "f":
        spec["data"] = [float(v) for v in array.ravel().astype(str)]  # the float32 value's shortest repr
    else:
        spec["data"] = array.ravel().tolist()
    return Tensor(spec)


def binary_inputs(request: dict, raw: bytes) -> list[Tensor]:
    """The request's input tensors, each with its share of `raw` (the bytes after the JSON header
    under the binary extension) where its parameters give a `binary_data_size`."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise invalid(f"'inputs' must be a non-empty list of tensor objects. Received: {inputs!r}")
    tensors, offset = [], 0
    for tensor in inputs:
        size = _parameters(tensor, f"input {tensor.get('name')!r}").get("binary_data_size")
        if size is None:
            tensors.append(Tensor(tensor))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(raw):
            raise invalid(f"Input {tensor.get('name')!r} claims binary_data_size {size!r}; "
                          f"{len(raw) - offset} bytes of binary data are left.")
        tensors.append(Tensor(tensor, raw[offset:offset + size]))
        offset += size
    if offset != len(raw):
        raise invalid(f"The request carries {len(raw) - offset} bytes of binary data that no input claims.")
    return tensors

