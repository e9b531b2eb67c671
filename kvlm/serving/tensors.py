"""`TensorProto` <-> numpy, checked against a signature's input specs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from kvlm.serving.errors import invalid

# Typed value fields of a TensorProto, by dtype.
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val", types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val", types_pb2.DT_UINT16: "int_val", types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val", types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_HALF: "half_val", types_pb2.DT_BFLOAT16: "half_val", types_pb2.DT_STRING: "string_val",
}


def dtype_name(dtype: int) -> str:
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else f"dtype {dtype}"


@dataclass(frozen=True)
class InputSpec:
    """What one signature input accepts, precomputed from its `tf.TensorSpec`."""

    name: str
    dtype: int
    numpy_dtype: np.dtype | None
    item_size: int
    shape: tuple[int | None, ...] | None  # None: any rank
    batched: bool  # dimension 0 is the batch

    @classmethod
    def from_spec(cls, name: str, spec: tf.TensorSpec, check_shape: bool = True) -> "InputSpec":
        """With `check_shape=False` any shape is taken (as TF Serving feeds TF1 graphs)."""
        shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
        is_string = spec.dtype == tf.string
        return cls(
            name, spec.dtype.as_datatype_enum, None if is_string else np.dtype(spec.dtype.as_numpy_dtype),
            0 if is_string else spec.dtype.size, shape if check_shape else None, bool(shape) and shape[0] is None,
        )


def input_specs(specs: Mapping[str, tf.TensorSpec], check_shape: bool = True) -> dict[str, InputSpec]:
    return {name: InputSpec.from_spec(name, spec, check_shape) for name, spec in specs.items()}


def check_dimensions(dims: tuple[int, ...], spec: InputSpec) -> None:
    """Checks an input's shape against its spec's rank and fixed dimensions."""
    if spec.shape is None:
        return
    if len(dims) != len(spec.shape):
        raise invalid(
            f"Input '{spec.name}' must have rank {len(spec.shape)} (shape {list(spec.shape)}), "
            f"got rank {len(dims)} (shape {list(dims)})."
        )
    for axis, (want, got) in enumerate(zip(spec.shape, dims)):
        if want is not None and want != got:
            raise invalid(f"Input '{spec.name}' must have size {want} on axis {axis}, got shape {list(dims)}.")


def to_ndarray(proto: tensor_pb2.TensorProto, spec: InputSpec) -> np.ndarray:
    """Converts one request input, checking dtype, rank, fixed dimensions and element count."""
    name = spec.name
    if proto.dtype != spec.dtype:
        raise invalid(f"Input '{name}' must be {dtype_name(spec.dtype)}, got {dtype_name(proto.dtype)}.")
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"Input '{name}' has an unknown rank; send its shape.")
    dims = tuple(d.size for d in proto.tensor_shape.dim)
    if any(d < 0 for d in dims):
        raise invalid(f"Input '{name}' has a negative dimension in shape {list(dims)}.")
    check_dimensions(dims, spec)
    count = math.prod(dims)
    if proto.dtype == types_pb2.DT_STRING:
        if proto.tensor_content or len(proto.string_val) != count:
            raise invalid(f"Input '{name}' has {len(proto.string_val)} values for shape {list(dims)} ({count} values).")
        return np.array(proto.string_val, dtype=object).reshape(dims)
    if proto.tensor_content:
        size = len(proto.tensor_content)
        if size != count * spec.item_size:
            raise invalid(f"Input '{name}': tensor_content holds {size} bytes, which does not match shape {list(dims)}.")
        return np.frombuffer(proto.tensor_content, dtype=spec.numpy_dtype).reshape(dims)
    field = _VALUE_FIELDS.get(proto.dtype)
    if field is None:
        raise invalid(f"Input '{name}' has unsupported dtype {dtype_name(proto.dtype)}.")
    values = len(getattr(proto, field))
    if values != count and values != 1:  # TensorFlow repeats a single value
        raise invalid(f"Input '{name}' has {values} values for shape {list(dims)} ({count} values).")
    try:
        return tf.make_ndarray(proto)
    except (ValueError, TypeError) as error:
        raise invalid(f"Input '{name}' is malformed: {error}") from None


def fill_tensor_proto(proto: tensor_pb2.TensorProto, value) -> tensor_pb2.TensorProto:
    """Writes one output (a numpy array) into `proto`, as `tf.make_tensor_proto` would."""
    array = np.asarray(value)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype == object or array.dtype.kind in "SU":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel())
    else:
        proto.dtype = tf.as_dtype(array.dtype).as_datatype_enum
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def to_tensor_proto(value) -> tensor_pb2.TensorProto:
    """A new `TensorProto` holding `value` (see `fill_tensor_proto`)."""
    return fill_tensor_proto(tensor_pb2.TensorProto(), value)


def check_inputs(inputs: Mapping[str, tensor_pb2.TensorProto], specs: Mapping[str, InputSpec]) -> dict[str, np.ndarray]:
    """Checks names, dtypes, ranks and a common batch size; returns numpy arrays.

    Raises `ServingError(INVALID_ARGUMENT)` naming the missing, extra or malformed input.
    """
    if len(inputs) != len(specs) or any(name not in specs for name in inputs):
        missing = sorted(set(specs) - set(inputs))
        extra = sorted(set(inputs) - set(specs))
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if extra:
            parts.append(f"unexpected input(s) {extra}")
        raise invalid(f"{'; '.join(parts).capitalize()}; the signature takes {sorted(specs)}.")
    return check_batch({name: to_ndarray(inputs[name], spec) for name, spec in specs.items()}, specs)


def check_arrays(arrays: Mapping[str, np.ndarray], specs: Mapping[str, InputSpec]) -> dict[str, np.ndarray]:
    """`check_inputs` for inputs already converted to arrays of their specs' dtypes (the REST API's)."""
    for name, spec in specs.items():
        check_dimensions(arrays[name].shape, spec)
    return check_batch(dict(arrays), specs)


def check_batch(arrays: dict[str, np.ndarray], specs: Mapping[str, InputSpec]) -> dict[str, np.ndarray]:
    """Checks that the batched inputs share a non-empty batch dimension; returns `arrays`."""
    unbatched = sorted(name for name, spec in specs.items() if spec.batched and arrays[name].ndim == 0)
    if unbatched:
        raise invalid(f"Input(s) {unbatched} must have a batch dimension (dimension 0); got scalars.")
    batched = {name: arrays[name].shape[0] for name, spec in specs.items() if spec.batched}
    sizes = set(batched.values())
    if len(sizes) > 1:
        listed = ", ".join(f"'{n}' has {s}" for n, s in sorted(batched.items()))
        raise invalid(f"Inputs must have the same batch size (dimension 0): {listed}.")
    if sizes == {0}:
        raise invalid("The batch is empty: inputs have size 0 on dimension 0.")
    return arrays


def batch_size(arrays: Mapping[str, np.ndarray], specs: Mapping[str, InputSpec]) -> int | None:
    """The common size of the batch dimension, or None when no input has one."""
    for name, spec in specs.items():
        if spec.batched:
            return int(arrays[name].shape[0])
    return None
