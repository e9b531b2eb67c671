"""TF Serving's REST JSON formats: tensors in row (`instances`) and columnar (`inputs`) form,
`{"b64": ...}` for binary strings, and `tf.Example`s for classify and regress.

Requests are converted against the signature's inputs (their dtypes), responses
from numpy outputs: float32 values are written with their shortest representation
(`3.5`, `0.1`), strings as UTF-8, and binary strings (outputs whose name ends with
`_bytes`, or that are not UTF-8) as `{"b64": ...}`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import numpy as np
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2

from kvlm.serving.errors import invalid
from kvlm.serving.tensors import InputSpec, dtype_name


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _b64decode(value: dict) -> bytes:
    text = value["b64"]
    if not isinstance(text, str):
        raise invalid(f"'b64' must hold a base64 string, got {type(text).__name__}.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid(f"Unable to base64 decode: {error}") from None


def _strings(value):
    if isinstance(value, list):
        return [_strings(v) for v in value]
    if _is_b64(value):
        return _b64decode(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise invalid(f"Expected a string or {{\"b64\": ...}} for a string tensor, got {value!r}.")


def to_array(value, spec: InputSpec) -> np.ndarray:
    """A JSON value (nested lists) as an array of the input's dtype; INVALID_ARGUMENT if it does not fit."""
    try:
        if spec.dtype == types_pb2.DT_STRING:
            array = np.array(_strings(value), dtype=object)
            if array.dtype != object or any(not isinstance(v, bytes) for v in array.ravel()):
                raise ValueError("the lists are not all the same length")
            return array
        if spec.numpy_dtype is None or isinstance(value, dict) or _holds(value, (str, dict)):
            raise ValueError(f"it does not fit {dtype_name(spec.dtype)}")
        return np.array(value, dtype=spec.numpy_dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise invalid(f"Failed to process the value of input '{spec.name}': {error}.") from None


def _holds(value, types) -> bool:
    if isinstance(value, list):
        return any(_holds(v, types) for v in value)
    return isinstance(value, types)


def request_arrays(body: Mapping, specs: Mapping[str, InputSpec]) -> tuple[dict[str, np.ndarray], bool]:
    """`(arrays, row_format)` from a predict request body (`instances` or `inputs`)."""
    if ("instances" in body) == ("inputs" in body):
        raise invalid("The request body must contain exactly one of 'instances' (row format) or 'inputs' "
                      "(columnar format).")
    row = "instances" in body
    data = body["instances" if row else "inputs"]
    named = _named(data, row)
    if named is None:
        if len(specs) != 1:
            raise invalid(f"The signature has {len(specs)} inputs {sorted(specs)}: name them "
                          "(a list of objects in 'instances', an object in 'inputs').")
        named = {next(iter(specs)): data}
    unknown = sorted(set(named) - set(specs))
    missing = sorted(set(specs) - set(named))
    if unknown or missing:
        raise invalid(f"The request names inputs {sorted(named)}, the signature takes {sorted(specs)}.")
    return {name: to_array(named[name], specs[name]) for name in specs}, row


def _named(data, row: bool) -> dict | None:
    """The values by input name when the request names its inputs, else None."""
    if not row:
        return data if isinstance(data, dict) and not _is_b64(data) else None
    if not isinstance(data, list) or not data:
        raise invalid("'instances' must be a non-empty list.")
    objects = [isinstance(i, dict) and not _is_b64(i) for i in data]
    if not any(objects):
        return None
    if not all(objects):
        raise invalid("Every element of 'instances' must be an object naming the inputs, or none may be.")
    keys = set(data[0])
    if any(set(i) != keys for i in data):
        raise invalid("Every instance must name the same inputs.")
    return {key: [i[key] for i in data] for key in keys}


def to_json(array: np.ndarray, name: str = ""):
    """An output array as JSON values (nested lists)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        binary = name.endswith("_bytes")
        values = [_string_json(v, binary) for v in array.ravel()]
    elif array.dtype.kind == "f":
        values = [float(v) for v in array.ravel().astype(str)]  # shortest repr of the float32 value
    else:
        return array.tolist()
    return np.array(values, dtype=object).reshape(array.shape).tolist()


def _string_json(value, binary: bool):
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    if not binary:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(data).decode("ascii")}


def response_json(outputs: Mapping[str, np.ndarray], row: bool) -> dict:
    """`{"predictions": ...}` (row format) or `{"outputs": ...}` (columnar)."""
    if not row:
        converted = {name: to_json(value, name) for name, value in outputs.items()}
        return {"outputs": next(iter(converted.values())) if len(converted) == 1 else converted}
    sizes = {name: (np.shape(value)[0] if np.ndim(value) else None) for name, value in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        listed = ", ".join(f"'{n}': {s}" for n, s in sorted(sizes.items()))
        raise invalid(f"The outputs do not share a batch size ({listed}); ask in the columnar format ('inputs').")
    converted = {name: to_json(value, name) for name, value in outputs.items()}
    if len(converted) == 1:
        return {"predictions": next(iter(converted.values()))}
    count = next(iter(sizes.values()))
    return {"predictions": [{name: value[i] for name, value in converted.items()} for i in range(count)]}


def to_feature(value) -> feature_pb2.Feature:
    """A `tf.train.Feature` from a JSON value: integers -> int64_list, numbers -> float_list,
    strings and `{"b64": ...}` -> bytes_list (a scalar or a list of one kind)."""
    values = value if isinstance(value, list) else [value]
    feature = feature_pb2.Feature()
    if all(isinstance(v, (str, dict)) for v in values) and values:
        feature.bytes_list.value.extend(_b64decode(v) if _is_b64(v) else _text(v) for v in values)
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        feature.int64_list.value.extend(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        feature.float_list.value.extend(values)
    else:
        raise invalid(f"Feature values must be numbers, strings or {{\"b64\": ...}} of one kind, got {value!r}.")
    return feature


def _text(value) -> bytes:
    if not isinstance(value, str):
        raise invalid(f"Expected a string or {{\"b64\": ...}}, got {value!r}.")
    return value.encode("utf-8")


def to_example(features) -> example_pb2.Example:
    if not isinstance(features, dict):
        raise invalid(f"An example must be an object of features, got {type(features).__name__}.")
    example = example_pb2.Example()
    for name, value in features.items():
        example.features.feature[name].CopyFrom(to_feature(value))
    return example


def fill_input(request_input, body: Mapping) -> None:
    """Fills a `tensorflow.serving.Input` from a classify/regress body (`examples`, optional `context`)."""
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid("The request body needs 'examples': a non-empty list of objects.")
    if "context" in body:
        target = request_input.example_list_with_context
        target.context.CopyFrom(to_example(body["context"]))
    else:
        target = request_input.example_list
    target.examples.extend(to_example(e) for e in examples)


def float_json(value: float) -> float:
    """A float32 result (a score or a regression value) with its shortest representation."""
    return float(str(np.float32(value)))
