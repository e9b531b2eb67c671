"""A client for TF Serving's gRPC API (kvlm's embedded server or `tensorflow_model_server`).

Uses only the official `tensorflow-serving-api` stubs. Input names come from
GetModelMetadata, and every call carries an explicit timeout.

Example:
    >>> with PredictClient("localhost:8500", timeout=5.0) as client:
    ...     result = client.ask("kvlm", [open("cat.png", "rb").read()], ["what color is it?"])
    ...     result["answer"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

DEFAULT_SIGNATURE = "serving_default"


class PredictClient:
    """Calls Predict, GetModelMetadata and GetModelStatus on `target` ("host:port").

    Args:
        target: Server address.
        timeout: Seconds allowed for each call.
        auth_token: Sent as `authorization: Bearer <token>` metadata.
        root_certificates: PEM CA bundle: connect with TLS (`b""` is not allowed; pass
            None for a plaintext channel).
        private_key, certificate_chain: PEM client key and certificate for mutual TLS.
        max_message_bytes: Largest request or response the channel accepts.
    """

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        auth_token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        max_message_bytes: int = 32 * 1024 * 1024,
    ):
        if timeout <= 0:
            raise ValueError(f"`timeout` must be positive. Received: timeout={timeout}")
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signatures: dict[tuple, dict] = {}

    @staticmethod
    def _spec(model_name: str, version: int | None, signature_name: str | None = None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=model_name)
        if version is not None:
            spec.version.value = version
        if signature_name:
            spec.signature_name = signature_name
        return spec

    def metadata(self, model_name: str, version: int | None = None) -> dict[str, dict]:
        """Signatures by name: `{"inputs": {name: (dtype, shape)}, "outputs": {...}}`."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._spec(model_name, version), metadata_field=["signature_def"]
        )
        response = self._predict.GetModelMetadata(request, timeout=self.timeout, metadata=self._metadata)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def describe(infos):
            return {
                name: (
                    tf.dtypes.as_dtype(info.dtype).name,
                    None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim],
                )
                for name, info in infos.items()
            }

        return {
            name: {"inputs": describe(sig.inputs), "outputs": describe(sig.outputs)}
            for name, sig in signature_map.signature_def.items()
        }

    def status(self, model_name: str, version: int | None = None) -> list[dict]:
        """Version states: `[{"version", "state", "error_code", "error_message"}]`."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._spec(model_name, version))
        response = self._models.GetModelStatus(request, timeout=self.timeout, metadata=self._metadata)
        state = get_model_status_pb2.ModelVersionStatus.State
        return [
            {
                "version": s.version,
                "state": state.Name(s.state),
                "error_code": s.status.error_code,
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    def wait_until_available(self, model_name: str, seconds: float, poll: float = 0.5) -> list[dict]:
        """Polls GetModelStatus until a version is AVAILABLE; raises TimeoutError after `seconds`."""
        import time

        deadline = time.monotonic() + seconds
        last = "no answer"
        while True:
            try:
                states = self.status(model_name)
                if any(s["state"] == "AVAILABLE" for s in states):
                    return states
                last = f"states {states}"
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Model {model_name!r} at {self.target} not available after {seconds:g}s ({last})")
            time.sleep(poll)

    def predict(
        self,
        model_name: str,
        inputs: Mapping[str, object],
        signature_name: str = DEFAULT_SIGNATURE,
        version: int | None = None,
        output_filter: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Sends `inputs` (arrays or lists) as they are; returns the outputs as numpy arrays."""
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(model_name, version, signature_name), output_filter=list(output_filter)
        )
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        response = self._predict.Predict(request, timeout=self.timeout, metadata=self._metadata)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def _input_names(self, model_name: str, version: int | None, signature_name: str) -> tuple[str, str]:
        """The (image, text) input names of a signature, read from GetModelMetadata once."""
        key = (model_name, version, signature_name)
        if key not in self._signatures:
            signatures = self.metadata(model_name, version)
            if signature_name not in signatures:
                raise ValueError(f"Model {model_name!r} has no signature {signature_name!r}; it has {sorted(signatures)}.")
            self._signatures[key] = signatures[signature_name]["inputs"]
        inputs = self._signatures[key]
        strings = [name for name, (dtype, _) in inputs.items() if dtype == "string"]
        images = [name for name in strings if "image" in name]
        texts = [name for name in strings if name not in images]
        if len(inputs) != 2 or len(images) != 1 or len(texts) != 1:
            raise ValueError(
                f"Signature {signature_name!r} of {model_name!r} does not take one image and one text "
                f"string input; its inputs are {inputs}."
            )
        return images[0], texts[0]

    def ask(
        self,
        model_name: str,
        images: Sequence[bytes],
        texts: Sequence[str],
        signature_name: str = DEFAULT_SIGNATURE,
        version: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Encoded images and questions in, the signature's outputs (answer, scores, ...) out."""
        if len(images) != len(texts):
            raise ValueError(f"Got {len(images)} images but {len(texts)} texts.")
        image_name, text_name = self._input_names(model_name, version, signature_name)
        inputs = {
            image_name: np.array(list(images), dtype=object),
            text_name: np.array([t.encode("utf-8") if isinstance(t, str) else t for t in texts], dtype=object),
        }
        return self.predict(model_name, inputs, signature_name, version)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PredictClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
