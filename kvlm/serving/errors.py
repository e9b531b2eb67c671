"""Errors carrying the gRPC status code a request fails with."""

from __future__ import annotations

import re

import grpc

# "[[{{function_node f}}{{node f/op}}]]": the failing node, inside the functions that called it.
_NODE = re.compile(r"\{\{(function_)?node ([^}]+)\}\}")
_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[{{")


class ServingError(Exception):
    """A request error: `code` is the gRPC status returned to the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def status_from_tf_code(code: int) -> grpc.StatusCode:
    """TensorFlow error codes are numbered as gRPC's status codes."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def from_tf_error(error) -> ServingError:
    """A `ServingError` from a `tf.errors.OpError`, with TF's graph noise removed.

    Keeps the op's message and names the failing node, e.g.
    "Input is empty. (op map/while/decode_image/DecodeImage)".
    """
    text = str(getattr(error, "message", error))
    found = _NODE.findall(text)
    nodes = [name for function, name in found if not function] or [name for _, name in found]
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE) and not line.startswith("File ")]
    message = " ".join(kept) or text.strip()
    if nodes:
        message = f"{message} (op {nodes[-1]})"
    return ServingError(status_from_tf_code(error.error_code), message)
