"""TF Serving's API on top of the model manager, for the gRPC and the REST front ends alike.

Every method takes and returns the `tensorflow-serving-api` request and response
messages and raises `ServingError` (a gRPC status and a message) for a bad
request. Predict runs any signature; Classify and Regress run
`tensorflow/serving/classify` / `.../regress` signatures on `tf.Example`s, with
TF Serving's result layout and messages; MultiInference runs several of them on
the same examples. Requests go through the server's image limits
(`kvlm.serving.limits`) and are counted in `Metrics`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import grpc
import numpy as np
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    input_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)

from kvlm.export.names import EXPERT_OUTPUT
from kvlm.serving.config import model_configs_from_proto
from kvlm.serving.errors import ServingError, invalid, not_found
from kvlm.serving.limits import DecodeBudget, decode_bytes
from kvlm.serving.metrics import Metrics
from kvlm.serving.models import LoadedVersion, ModelManager, Signature
from kvlm.serving.tensors import check_inputs, dtype_name, fill_tensor_proto

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def version_request(spec) -> tuple[int | None, str | None]:
    """`(version, label)` asked for by a `ModelSpec` (both None: the latest)."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def serialized_examples(request_input: input_pb2.Input) -> np.ndarray:
    """The examples of an `Input` as serialized `tf.Example`s; context features are merged into each."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(request_input.example_list.examples)
    elif kind == "example_list_with_context":
        listed = request_input.example_list_with_context
        examples = []
        for example in listed.examples:
            merged = example_pb2.Example()
            merged.CopyFrom(listed.context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        examples = []
    if not examples:
        raise invalid("Input is empty.")
    return np.array([e.SerializeToString() for e in examples], dtype=object)


class InferenceService:
    """PredictionService and ModelService methods, shared by gRPC and REST."""

    def __init__(self, manager: ModelManager, metrics: Metrics, max_image_pixels: int = 0, max_decode_bytes: int = 0):
        self.manager = manager
        self.metrics = metrics
        self.max_image_pixels = max_image_pixels
        self.budget = DecodeBudget(max_decode_bytes)

    def measured(self, api: str, entrypoint: str, model_name: str, call: Callable[[], object]):
        """Runs `call()`, records its status and latency; unexpected errors become INTERNAL."""
        start = time.perf_counter()
        code = "OK"
        try:
            return call()
        except ServingError as error:
            code = error.code.name
            raise
        except Exception as error:  # a bug: the client gets INTERNAL, the log the trace
            code = grpc.StatusCode.INTERNAL.name
            logger.exception("%s failed", api)
            raise ServingError(grpc.StatusCode.INTERNAL, f"{api} failed: {error}") from None
        finally:
            self.metrics.request(model_name, api, entrypoint, code, time.perf_counter() - start)

    def _resolve(self, spec) -> LoadedVersion:
        return self.manager.model(spec.name).resolve(*version_request(spec))

    def _use(self, spec) -> contextlib.AbstractContextManager[LoadedVersion]:
        """The version `spec` asks for, kept loaded while the request runs on it."""
        return self.manager.model(spec.name).use(*version_request(spec))

    def run(self, loaded: LoadedVersion, signature: Signature, arrays: dict, timeout: float | None):
        """Runs a signature within the image limits; returns `(outputs, batch_size)`."""
        try:
            size = decode_bytes(arrays, self.max_image_pixels)
            self.budget.acquire(size)
        except ServingError as error:
            reason = "pixels" if error.code == grpc.StatusCode.INVALID_ARGUMENT else "decode_memory"
            self.metrics.count("rejected_image_count", loaded.model_name, reason)
            raise
        try:
            outputs, batch = loaded.predict(signature, arrays, timeout)
        finally:
            self.budget.release(size)
        self._count_experts(loaded.model_name, outputs.get(EXPERT_OUTPUT))
        return outputs, batch

    def _count_experts(self, model_name: str, experts: np.ndarray | None) -> None:
        """Counts the examples each expert answered (a signature's string `expert` output)."""
        if experts is None or experts.dtype != object:
            return
        names, counts = np.unique(experts.ravel(), return_counts=True)
        for name, count in zip(names, counts):
            label = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            self.metrics.count("expert_answer_count", model_name, label, value=int(count))

    def predict(self, request: predict_pb2.PredictRequest, timeout: float | None = None):
        """Runs one Predict request; returns `(response, batch_size)`."""
        spec = request.model_spec
        with self._use(spec) as loaded:
            signature = loaded.signature(spec.signature_name or DEFAULT_SIGNATURE)
            arrays = check_inputs(request.inputs, signature.inputs)
            outputs, size = self.predict_arrays(loaded, signature, arrays, list(request.output_filter), timeout)
        response = predict_pb2.PredictResponse()
        _fill_spec(response.model_spec, spec.name, loaded.version, signature.name)
        for name, value in outputs.items():
            fill_tensor_proto(response.outputs[name], value)
        return response, size

    def predict_arrays(
        self, loaded: LoadedVersion, signature: Signature, arrays: dict[str, np.ndarray],
        output_filter: list[str] | None = None, timeout: float | None = None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Predict on checked input arrays; returns the outputs `output_filter` names (all by default)
        and the size of the batch the request ran in."""
        wanted = output_filter or list(signature.outputs)
        unknown = sorted(set(wanted) - set(signature.outputs))
        if unknown:
            raise invalid(f"Unknown output(s) {unknown} in output_filter; the signature returns {sorted(signature.outputs)}.")
        outputs, size = self.run(loaded, signature, arrays, timeout)
        return {name: outputs[name] for name in wanted}, size

    def _examples_signature(self, loaded: LoadedVersion, name: str, method: str) -> Signature:
        signature = loaded.signature(name or DEFAULT_SIGNATURE)
        kind = method.rsplit("/", 1)[-1]
        if signature.method_name != method:
            raise invalid(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
        if len(signature.inputs) != 1:
            raise invalid(f"Expected one input Tensor in the {kind} signature '{signature.name}', "
                          f"got {sorted(signature.inputs)}.")
        return signature

    def _run_examples(self, loaded, signature: Signature, examples: np.ndarray, timeout):
        ((name, spec),) = signature.inputs.items()
        if spec.dtype != types_pb2.DT_STRING:
            raise invalid(f"The input '{name}' of signature '{signature.name}' must be a string tensor of "
                          f"serialized tf.Examples, not {dtype_name(spec.dtype)}.")
        return self.run(loaded, signature, {name: examples}, timeout)[0]

    def _classify(self, loaded, signature_name: str, examples: np.ndarray, timeout):
        signature = self._examples_signature(loaded, signature_name, CLASSIFY_METHOD)
        if "classes" not in signature.outputs and "scores" not in signature.outputs:
            raise invalid("Expected classification signature outputs to contain classes and/or scores.")
        outputs = self._run_examples(loaded, signature, examples, timeout)
        classes, scores = outputs.get("classes"), outputs.get("scores")
        count = len(examples)
        for name, value, dtype in (("classes", classes, object), ("scores", scores, np.float32)):
            if value is None:
                continue
            if value.ndim != 2 or value.shape[0] != count:
                raise invalid(f"Expected Tensor shape: [{count} num_classes] but got {list(value.shape)} "
                              f"for output '{name}'.")
            if (value.dtype == object) != (dtype is object):
                raise invalid(f"Expected {'string' if dtype is object else 'float'} output '{name}'.")
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise invalid(f"Tensors classes and scores should match in shape: {list(classes.shape)} vs "
                          f"{list(scores.shape)}.")
        result = classification_pb2.ClassificationResult()
        width = (scores if scores is not None else classes).shape[1]
        for i in range(count):
            classification = result.classifications.add()
            for j in range(width):
                entry = classification.classes.add()
                if classes is not None:
                    entry.label = classes[i, j].decode("utf-8", "replace")
                if scores is not None:
                    entry.score = float(scores[i, j])
        return result, signature.name

    def _regress(self, loaded, signature_name: str, examples: np.ndarray, timeout):
        signature = self._examples_signature(loaded, signature_name, REGRESS_METHOD)
        if "outputs" not in signature.outputs:
            raise invalid(f"No output Tensor named 'outputs' in the regression signature '{signature.name}'.")
        values = self._run_examples(loaded, signature, examples, timeout)["outputs"]
        count = len(examples)
        if not (values.shape == (count,) or values.shape == (count, 1)):
            raise invalid(f"Expected output Tensor shape to be either [{count}] or [{count}, 1] but got "
                          f"{list(values.shape)}.")
        if values.dtype.kind != "f":
            raise invalid(f"Expected a float output 'outputs' in the regression signature, got {values.dtype}.")
        result = regression_pb2.RegressionResult()
        for value in values.reshape(count):
            result.regressions.add(value=float(value))
        return result, signature.name

    def classify(self, request: classification_pb2.ClassificationRequest, timeout: float | None = None):
        return self._examples_response(request, self._classify, classification_pb2.ClassificationResponse, timeout)

    def regress(self, request: regression_pb2.RegressionRequest, timeout: float | None = None):
        return self._examples_response(request, self._regress, regression_pb2.RegressionResponse, timeout)

    def _examples_response(self, request, infer: Callable, response_type: type, timeout: float | None):
        """A Classify or Regress response: `infer` runs the request's examples on the resolved version."""
        spec = request.model_spec
        with self._use(spec) as loaded:
            result, name = infer(loaded, spec.signature_name, serialized_examples(request.input), timeout)
        response = response_type(result=result)
        _fill_spec(response.model_spec, spec.name, loaded.version, name)
        return response

    def multi_inference(self, request: inference_pb2.MultiInferenceRequest, timeout: float | None = None):
        if not request.tasks:
            raise invalid("MultiInferenceRequest must contain at least one task.")
        specs = [task.model_spec for task in request.tasks]
        if len({s.name for s in specs}) > 1:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        if len({s.SerializeToString() for s in (_version_only(s) for s in specs)}) > 1:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model version.")
        names = [s.signature_name or DEFAULT_SIGNATURE for s in specs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise invalid(f"Duplicate evaluation of signature: {duplicated[0]}")
        response = inference_pb2.MultiInferenceResponse()
        with self._use(specs[0]) as loaded:
            examples = serialized_examples(request.input)
            for task, name in zip(request.tasks, names):
                result = response.results.add()
                if task.method_name == CLASSIFY_METHOD:
                    classification, name = self._classify(loaded, name, examples, timeout)
                    result.classification_result.CopyFrom(classification)
                elif task.method_name == REGRESS_METHOD:
                    regression, name = self._regress(loaded, name, examples, timeout)
                    result.regression_result.CopyFrom(regression)
                else:
                    raise invalid(f"Unsupported signature method_name: {task.method_name!r}; MultiInference runs "
                                  f"{CLASSIFY_METHOD} and {REGRESS_METHOD}.")
                _fill_spec(result.model_spec, task.model_spec.name, loaded.version, name)
        return response

    def metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest):
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field.")
        unsupported = sorted(set(fields) - {"signature_def"})
        if unsupported:
            raise invalid(f"metadata_field {unsupported[0]!r} is not supported; the supported field is 'signature_def'.")
        loaded = self._resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        response.metadata["signature_def"].Pack(signature_def_map(loaded))
        return response

    def status(self, request: get_model_status_pb2.GetModelStatusRequest):
        model = self.manager.model(request.model_spec.name)
        version, label = version_request(request.model_spec)
        if label:
            version = model.resolve(label=label).version
        statuses = dict(model.status)
        if version is not None:
            if version not in statuses:
                raise not_found(f"Model '{model.config.name}' has no version {version}; known versions: {sorted(statuses)}.")
            statuses = {version: statuses[version]}
        if not statuses:
            raise not_found(f"Model '{model.config.name}' has no versions yet (looking in {model.config.base_path}).")
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, status in sorted(statuses.items()):
            entry = response.model_version_status.add(version=number, state=status.state)
            entry.status.error_code = status.error_code.value[0]
            entry.status.error_message = status.error_message
        return response

    def reload(self, request: model_management_pb2.ReloadConfigRequest):
        """HandleReloadConfigRequest: serve the `model_config_list` of `request.config`."""
        if request.config.WhichOneof("config") == "custom_model_config":
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "custom_model_config is not supported; send a "
                               "model_config_list.")
        try:
            configs = model_configs_from_proto(request.config)
        except ValueError as error:
            raise invalid(str(error)) from None
        self.manager.reload(configs)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0
        return response


def signature_def_map(loaded: LoadedVersion) -> get_model_metadata_pb2.SignatureDefMap:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in loaded.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature_def)
    return signature_map


def _version_only(spec):
    copy = type(spec)()
    copy.CopyFrom(spec)
    copy.ClearField("signature_name")
    return copy


def _fill_spec(spec, name: str, version: int, signature_name: str) -> None:
    spec.name = name
    spec.version.value = version
    spec.signature_name = signature_name
