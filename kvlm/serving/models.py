"""Loading SavedModel versions with plain TensorFlow, and keeping them up to date.

Each configured model's base path is polled; the versions its policy selects are
loaded and the others unloaded. A new version is loaded before the old one is
unloaded, and a version that fails to load leaves the previous one serving.

A version is loaded as TF Serving loads it: its `serve` meta graph is restored
into a session, its warm-up requests are replayed, and each signature runs as a
session callable feeding and fetching the tensors its `SignatureDef` names. That
serves TF1 and TF2 SavedModels alike and skips the per-call work of restored
Python functions (binding arguments, passing every captured variable).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2

from kvlm.export.layout import scan_versions
from kvlm.serving.batching import Batcher
from kvlm.serving.config import BatchingConfig, ModelConfig
from kvlm.serving.errors import ServingError, from_tf_error, invalid, not_found
from kvlm.serving.metrics import Metrics
from kvlm.serving.ops import load_tf_text_ops
from kvlm.serving.tensors import InputSpec, batch_size, check_inputs, input_specs

logger = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
MAX_LOAD_ATTEMPTS = 3
# How long unloading a version waits for the requests still running on it.
UNLOAD_WAIT_SECONDS = 60.0


@dataclass
class Signature:
    """A signature's input and output specs and its method name (`tensorflow/serving/predict`,
    `.../classify` or `.../regress`); `run(inputs)` returns the outputs as numpy arrays."""

    name: str
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    inputs: dict[str, InputSpec]
    outputs: dict[str, tf.TensorSpec]
    method_name: str = "tensorflow/serving/predict"


def read_serving_meta_graph(path: str | Path) -> meta_graph_pb2.MetaGraphDef:
    """The serving (`serve`-tagged) meta graph of a SavedModel."""
    path = Path(path)
    saved_model = saved_model_pb2.SavedModel()
    if (path / "saved_model.pb").is_file():
        saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    else:
        text_format.Parse((path / "saved_model.pbtxt").read_text(), saved_model)
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags or len(saved_model.meta_graphs) == 1:
            return meta_graph
    raise ValueError(f"{path} has no meta graph tagged 'serve'.")


def _tensor_spec(info: meta_graph_pb2.TensorInfo) -> tf.TensorSpec:
    return tf.TensorSpec(tf.TensorShape(info.tensor_shape), tf.as_dtype(info.dtype))


# Whether TensorFlow's idle intra-op threads spin for work (`set_thread_spinning`).
_thread_spinning = False


def set_thread_spinning(enabled: bool) -> None:
    """Lets sessions loaded from now on keep their idle intra-op threads spinning for work.

    Off by default: threads that spin after a request's ops finish take the CPU from the threads
    that send its response (measured on 2 cores, batch 1: served p50 1.13x a direct call with
    spinning, 0.8-0.9x without).
    """
    global _thread_spinning
    _thread_spinning = bool(enabled)


def _session_config() -> tf.compat.v1.ConfigProto:
    """The process's thread pool sizes (`configure_tensorflow`) and thread spinning
    (`set_thread_spinning`), soft placement, GPU memory on demand."""
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_parallelism_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        allow_soft_placement=True,
    )
    config.gpu_options.allow_growth = True
    config.experimental.disable_thread_spinning = not _thread_spinning
    return config


@contextlib.contextmanager
def _quiet_tensorflow_logger():
    """Hides the notice that `tf.compat.v1.saved_model.load` is deprecated: it is how TF Serving loads."""
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_logger.setLevel(level)


class LoadedVersion:
    """One loaded SavedModel version; `predict` runs a signature (batched if configured)."""

    def __init__(
        self, model_name: str, version: int, path: Path, batching: BatchingConfig | None = None,
        metrics: Metrics | None = None,
    ):
        self.model_name = model_name
        self.version = version
        self.path = path
        load_tf_text_ops()
        meta_graph = read_serving_meta_graph(path)
        self.signature_defs = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
        self._session = tf.compat.v1.Session(graph=tf.Graph(), config=_session_config())
        try:
            with self._session.graph.as_default(), _quiet_tensorflow_logger():
                tf.compat.v1.saved_model.load(self._session, list(meta_graph.meta_info_def.tags), str(path))
            # A TF1 graph (no object graph) takes any shape its ops accept, as in a TF Serving session.
            self.signatures = self._read_signatures(check_shape=bool(meta_graph.object_graph_def.nodes))
        except Exception:
            self._session.close()
            raise
        self._in_use = 0
        self._idle = threading.Condition()
        self._batchers: dict[str, Batcher] = {}
        if batching is not None:
            for name, signature in self.signatures.items():
                if all(spec.batched for spec in signature.inputs.values()):
                    self._batchers[name] = Batcher(
                        signature.run, batching, name=f"{model_name}/{version}/{name}",
                        on_batch=None if metrics is None else (
                            lambda size: metrics.observe("processed_batch_size", size, model_name)
                        ),
                    )

    def _read_signatures(self, check_shape: bool) -> dict[str, Signature]:
        signatures = {}
        for name, signature_def in self.signature_defs.items():
            tensors = [*signature_def.inputs.values(), *signature_def.outputs.values()]
            if not all(info.name for info in tensors):
                logger.warning("Model %s version %d: signature '%s' has sparse or composite tensors, which are "
                               "not served; skipping it.", self.model_name, self.version, name)
                continue
            signatures[name] = Signature(
                name, self._callable(signature_def),
                input_specs({k: _tensor_spec(v) for k, v in signature_def.inputs.items()}, check_shape),
                {k: _tensor_spec(v) for k, v in signature_def.outputs.items()},
                signature_def.method_name or "tensorflow/serving/predict",
            )
        return signatures

    def _callable(self, signature_def: meta_graph_pb2.SignatureDef):
        """`run(inputs) -> outputs` feeding and fetching the signature's tensors in the session."""
        input_names = sorted(signature_def.inputs)
        output_names = sorted(signature_def.outputs)
        options = config_pb2.CallableOptions(
            feed=[signature_def.inputs[k].name for k in input_names],
            fetch=[signature_def.outputs[k].name for k in output_names],
        )
        # The C++ `Session::MakeCallable` that TF Serving runs: like it, and unlike `Session.run`, it feeds
        # a placeholder any shape its ops accept (TF1 graphs often declare a narrower one).
        session_callable = self._session._make_callable_from_options(options)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                values = session_callable(*(inputs[k] for k in input_names))
            except tf.errors.OpError as error:
                raise from_tf_error(error) from None
            return dict(zip(output_names, values))

        return run

    def signature(self, name: str) -> Signature:
        if name not in self.signatures:
            raise not_found(
                f"Model '{self.model_name}' version {self.version} has no signature '{name}'; "
                f"signatures: {sorted(self.signatures)}."
            )
        return self.signatures[name]

    def predict(
        self, signature: Signature, arrays: dict[str, np.ndarray], timeout: float | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Runs `signature`; returns the outputs and the size of the batch that ran."""
        batcher = self._batchers.get(signature.name)
        size = batch_size(arrays, signature.inputs)
        if batcher is None or size is None:
            return signature.run(arrays), size or 1
        future = batcher.submit(arrays, size)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "The request's deadline passed while it was queued.") from None

    def warm_up(self) -> int:
        """Replays `assets.extra/tf_serving_warmup_requests`; returns the number of requests."""
        path = self.path / WARMUP_FILE
        if not path.is_file():
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if log.WhichOneof("log_type") != "predict_log":
                continue  # only Predict warm-up requests are replayed
            request = log.predict_log.request
            signature = self.signature(request.model_spec.signature_name or "serving_default")
            try:
                signature.run(check_inputs(request.inputs, signature.inputs))
            except ServingError as error:
                raise ValueError(f"warm-up request {count + 1} in {path} failed: {error.message}") from None
            count += 1
        return count

    def stats(self) -> dict[str, dict]:
        return {name: b.stats.snapshot() for name, b in self._batchers.items()}

    def acquire(self) -> None:
        """Marks one more request running on this version (`close` waits for it)."""
        with self._idle:
            self._in_use += 1

    def release(self) -> None:
        with self._idle:
            self._in_use -= 1
            if not self._in_use:
                self._idle.notify_all()

    def close(self, wait: float = UNLOAD_WAIT_SECONDS) -> None:
        """Waits up to `wait` seconds for the requests running on this version, then closes it."""
        with self._idle:
            if not self._idle.wait_for(lambda: not self._in_use, wait):
                logger.warning("Model %s version %d: closing with %d request(s) still running after %.0fs.",
                               self.model_name, self.version, self._in_use, wait)
        for batcher in self._batchers.values():
            batcher.close()
        self._session.close()


@dataclass
class VersionStatus:
    state: int
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    attempts: int = 0
    stamp: tuple = ()


def _stamp(path: Path) -> tuple:
    """Names, sizes and modification times of a version's files: changes when it is rewritten."""
    folders = [folder for folder in (path, path / "variables") if folder.is_dir()]
    files = [f for folder in folders for f in folder.iterdir() if f.is_file()]
    return tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


class ServedModel:
    """The loaded versions and load states of one configured model."""

    def __init__(self, config: ModelConfig, batching: BatchingConfig | None, metrics: Metrics | None = None):
        self.config = config
        self.batching = batching
        self.metrics = metrics
        self.versions: dict[int, LoadedVersion] = {}
        self.status: dict[int, VersionStatus] = {}
        self._lock = threading.Lock()
        self._skipped: dict[str, str] = {}

    def resolve(self, version: int | None = None, label: str | None = None) -> LoadedVersion:
        """The requested version (label, number, or the latest loaded). To run it, take it with `use`."""
        with self._lock:
            return self._find(version, label)

    @contextlib.contextmanager
    def use(self, version: int | None = None, label: str | None = None) -> Iterator[LoadedVersion]:
        """The requested version, kept loaded until the block ends: a new version rolling out
        unloads the old one only after the requests running on it have finished."""
        with self._lock:
            loaded = self._find(version, label)
            loaded.acquire()
        try:
            yield loaded
        finally:
            loaded.release()

    def _find(self, version: int | None, label: str | None) -> LoadedVersion:
        """`resolve` with `_lock` held."""
        name, versions = self.config.name, self.versions
        if label:
            if label not in self.config.labels:
                raise not_found(f"Model '{name}' has no version label '{label}'; labels: {sorted(self.config.labels)}.")
            version = self.config.labels[label]
        if version is None:
            if not versions:
                raise not_found(f"Model '{name}' has no loaded version (looking in {self.config.base_path}).")
            return versions[max(versions)]
        if version not in versions:
            raise not_found(f"Model '{name}' version {version} is not available; available versions: {sorted(versions)}.")
        return versions[version]

    def refresh(self) -> None:
        """Loads the versions the policy selects and unloads the others.

        A version that fails to load is passed over (the policy then picks among the
        others, e.g. the previous version) and retried on later polls, up to
        `MAX_LOAD_ATTEMPTS` times or until its files change.
        """
        found, skipped = scan_versions(self.config.base_path)
        self._log_skipped(skipped)
        failed_now: set[int] = set()
        while True:
            candidates = [v for v in found if v not in failed_now and self._may_load(v, found[v])]
            wanted = self.config.select(candidates)
            missing = [v for v in sorted(wanted, reverse=True) if v not in self.versions]
            if not missing:
                break
            for version in missing:
                if not self._load(version, found[version]):
                    failed_now.add(version)
        if any(v in self.versions for v in wanted) or not found:
            for version in sorted(set(self.versions) - set(wanted)):
                self._unload(version)

    def _log_skipped(self, skipped: dict[str, str]) -> None:
        """Logs each skipped folder once (again when its reason changes)."""
        for name, reason in sorted(skipped.items()):
            if self._skipped.get(name) != reason:
                logger.warning("Model %s: skipping %s: %s", self.config.name, self.config.base_path / name, reason)
        self._skipped = skipped

    def _may_load(self, version: int, path: Path) -> bool:
        """False for a version that failed `MAX_LOAD_ATTEMPTS` times and has not changed since."""
        status = self.status.get(version)
        if status is None or version in self.versions or status.attempts < MAX_LOAD_ATTEMPTS:
            return True
        if status.stamp != _stamp(path):
            status.attempts = 0  # new files: try again
            return True
        return False

    def _load(self, version: int, path: Path) -> bool:
        status = self.status.setdefault(version, VersionStatus(State.START))
        status.state, status.attempts, status.stamp = State.LOADING, status.attempts + 1, _stamp(path)
        start = time.perf_counter()
        loaded = None
        try:
            loaded = LoadedVersion(self.config.name, version, path, self.batching, self.metrics)
            warmups = loaded.warm_up()
        except Exception as error:  # any load failure is reported, never fatal
            if loaded is not None:
                loaded.close()
            self._count_load(path, "fail")
            status.state = State.END
            status.error_code = grpc.StatusCode.UNKNOWN
            status.error_message = f"Failed to load {path}: {error}"
            logger.error("Model %s version %d failed to load (attempt %d): %s",
                         self.config.name, version, status.attempts, error)
            return False
        with self._lock:
            self.versions[version] = loaded
        self._count_load(path, "success")
        status.state, status.error_code, status.error_message = State.AVAILABLE, grpc.StatusCode.OK, ""
        logger.info("Loaded model %s version %d from %s in %.1fs (%d warm-up requests)",
                    self.config.name, version, path, time.perf_counter() - start, warmups)
        return True

    def _count_load(self, path: Path, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count("load_attempt_count", str(path), outcome)

    def _unload(self, version: int) -> None:
        self.status[version].state = State.UNLOADING
        with self._lock:
            loaded = self.versions.pop(version)
        loaded.close()  # after the requests still running on it
        self.status[version].state = State.END
        logger.info("Unloaded model %s version %d", self.config.name, version)

    def close(self) -> None:
        for version in sorted(self.versions):
            self._unload(version)


class ModelManager:
    """Serves the configured models and polls their base paths for new versions."""

    def __init__(
        self, configs: list[ModelConfig], batching: BatchingConfig | None = None, poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
    ):
        self.batching = batching
        self.metrics = metrics
        self.models = {c.name: ServedModel(c, batching, metrics) for c in configs}
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        # Called with no arguments after each refresh and reload (health statuses follow them).
        self.listeners: list[Callable[[], None]] = []

    def refresh(self) -> None:
        with self._refresh_lock:
            for model in self.models.values():
                model.refresh()
        self._notify()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def reload(self, configs: list[ModelConfig]) -> None:
        """Serves exactly `configs` (HandleReloadConfigRequest): new models are loaded, dropped ones
        unloaded, and a changed config takes effect (its versions are reloaded if its path changed)."""
        with self._refresh_lock:
            wanted = {c.name: c for c in configs}
            models = dict(self.models)
            for name in sorted(set(models) - set(wanted)):
                models.pop(name).close()
            for name, config in wanted.items():
                current = models.get(name)
                if current is not None and current.config.base_path == config.base_path:
                    current.config = config
                else:
                    if current is not None:
                        current.close()
                    models[name] = ServedModel(config, self.batching, self.metrics)
            self.models = models
            for model in models.values():
                model.refresh()
        self._notify()
        logger.info("Reloaded the model config: serving %s", sorted(wanted))

    def start(self) -> None:
        """Loads the current versions, then polls every `poll_seconds` (0: never)."""
        self.refresh()
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # keep polling whatever happens
                logger.exception("Polling model versions failed")

    def model(self, name: str) -> ServedModel:
        """The served model called `name`: INVALID_ARGUMENT for path-like names, NOT_FOUND if unknown."""
        if not name:
            raise invalid("ModelSpec.name is empty: name the model to query.")
        if name not in self.models:
            from kvlm.export.layout import validate_model_name

            try:
                validate_model_name(name)
            except ValueError as error:
                raise invalid(str(error)) from None
            raise not_found(f"Model '{name}' is not served; served models: {sorted(self.models)}.")
        return self.models[name]

    def stats(self) -> dict[str, dict]:
        """Batching statistics by model, version and signature."""
        return {
            name: {str(v): loaded.stats() for v, loaded in sorted(model.versions.items())}
            for name, model in self.models.items()
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._refresh_lock:
            for model in self.models.values():
                model.close()
