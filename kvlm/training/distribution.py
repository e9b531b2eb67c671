"""Choosing how training is spread over devices and machines.

TensorFlow backend: `tf.distribute` strategies (`one_device`, `mirrored`,
`multi_worker`; the cluster comes from `TF_CONFIG`). JAX backend:
`keras.distribution` (`data_parallel`, `expert_parallel`; several processes join
through `keras.distribution.initialize` and the `KERAS_DISTRIBUTION_*`
variables). `auto` picks what the environment describes.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

import keras

STRATEGIES: dict[str, tuple[str, ...]] = {
    "tensorflow": ("auto", "one_device", "mirrored", "multi_worker"),
    "jax": ("auto", "one_device", "data_parallel", "expert_parallel"),
    "torch": ("auto", "one_device"),
}
ALL_STRATEGIES = tuple(dict.fromkeys(name for names in STRATEGIES.values() for name in names))
JAX_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
# Stacked built-in expert weights of `kvlm.layers.moe.SparseMoE`: `(experts, ...)`.
EXPERT_KERNELS = r"(?:.*/)?(?:inner|outer)_kernel"
EXPERT_BIASES = r"(?:.*/)?(?:inner|outer)_bias"


@dataclass
class Distribution:
    """A resolved strategy: what the model is built, compiled and trained under.

    Attributes:
        name: The strategy (`default` when nothing is distributed).
        backend: The Keras backend it was made for.
        strategy: The `tf.distribute.Strategy` (TensorFlow) or None.
        distribution: The `keras.distribution.Distribution` (JAX) or None.
        batch_shards: Parts each global batch is split into (data-parallel replicas).
        num_workers, worker_index: The cluster: machines (TF workers / JAX processes)
            and this one's index.
        is_chief: Whether this worker writes the run folder (the others write
            `<output>/workers/<index>`).
    """

    name: str
    backend: str
    strategy: Any = None
    distribution: Any = None
    batch_shards: int = 1
    num_workers: int = 1
    worker_index: int = 0
    is_chief: bool = True

    def scope(self):
        """Context to build and compile the model in."""
        if self.strategy is not None:
            return self.strategy.scope()
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()

    @property
    def even_batches(self) -> bool:
        """True when every batch must split evenly (JAX shards arrays by batch)."""
        return self.backend == "jax" and self.batch_shards > 1


def tf_config() -> dict[str, Any] | None:
    """The parsed `TF_CONFIG` (`{"cluster": {...}, "task": {"type", "index"}}`), or None when unset."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: TF_CONFIG={raw!r}") from None
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(f'TF_CONFIG needs a "cluster" dict of job name -> addresses. Received: TF_CONFIG={raw!r}')
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f'TF_CONFIG needs a "task" with "type" and "index". Received: TF_CONFIG={raw!r}')
    if task["type"] not in cluster or not 0 <= int(task["index"]) < len(cluster[task["type"]]):
        raise ValueError(f"TF_CONFIG task {task} is not in its cluster {cluster}.")
    return config


def tf_cluster_position(config: dict[str, Any] | None = None) -> tuple[int, int, bool]:
    """`(num_workers, worker_index, is_chief)` from `TF_CONFIG` (the chief, or worker 0 without one)."""
    config = tf_config() if config is None else config
    if config is None:
        return 1, 0, True
    cluster, task = config["cluster"], config["task"]
    order = [(job, i) for job in ("chief", "worker") for i in range(len(cluster.get(job, [])))]
    position = (task["type"], int(task["index"]))
    index = order.index(position) if position in order else 0
    is_chief = position == ("chief", 0) or ("chief" not in cluster and position == ("worker", 0))
    return len(order), index, is_chief


def initialize_jax_processes() -> bool:
    """Joins a multi-process JAX run described by `KERAS_DISTRIBUTION_*`; True if one was joined.

    Calls `keras.distribution.initialize()`, which reads `KERAS_DISTRIBUTION_JOB_ADDRESSES`
    (the coordinator, process 0, first), `KERAS_DISTRIBUTION_NUM_PROCESSES` and
    `KERAS_DISTRIBUTION_PROCESS_ID`. Does nothing when they are unset or already joined.
    """
    import jax

    if int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")) <= 1:
        return False
    missing = [name for name in JAX_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"A multi-process JAX run needs all of {list(JAX_ENV)}; missing {missing}.")
    if not jax.distributed.is_initialized():
        keras.distribution.initialize()
    return True


def expert_layout_map(device_mesh, expert_axis: str = "model"):
    """A `LayoutMap` that splits every SparseMoE's stacked expert weights along the expert axis.

    Kernels `(experts, d, h)` / `(experts, h, d)` and biases `(experts, h)` / `(experts, d)`
    get `expert_axis` on their leading dimension, so each device holds
    `experts / mesh.shape[expert_axis]` experts. Everything else is replicated.
    """
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[EXPERT_KERNELS] = (expert_axis, None, None)
    layout_map[EXPERT_BIASES] = (expert_axis, None)
    return layout_map


def configure_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` logical TensorFlow devices (before TensorFlow starts).

    For trying `mirrored` on a machine without GPUs. On JAX set
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX starts instead.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise RuntimeError(
                f"Cannot split the CPU into {count} devices: TensorFlow is already initialised ({error})."
            ) from None


def _check_name(name: str, backend: str) -> None:
    if name in STRATEGIES.get(backend, ()):
        return
    if name not in ALL_STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Strategies: {list(ALL_STRATEGIES)}.")
    needs = [b for b, names in STRATEGIES.items() if name in names]
    raise ValueError(
        f"Strategy {name!r} needs the {' or '.join(needs)} backend, but Keras runs on {backend!r} "
        f"(set KERAS_BACKEND). On {backend} use one of: {list(STRATEGIES.get(backend, ('auto',)))}."
    )


def _tensorflow(name: str, apply_shims: bool) -> Distribution:
    import tensorflow as tf

    config = tf_config()
    if name == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        name = "multi_worker" if config and tf_cluster_position(config)[0] > 1 else "mirrored" if len(gpus) > 1 else ""
        if not name:
            return Distribution("default", "tensorflow")
    if name == "multi_worker":
        if apply_shims:
            from kvlm.training import shims

            shims.apply()
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            raise RuntimeError(
                f"Could not start MultiWorkerMirroredStrategy ({error}). Create it before any other "
                "TensorFlow work in the process, e.g. call kvlm.training.fit() first thing."
            ) from error
        workers, index, chief = tf_cluster_position(config)
        return Distribution(name, "tensorflow", strategy=strategy, batch_shards=strategy.num_replicas_in_sync,
                            num_workers=workers, worker_index=index, is_chief=chief)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy(devices[0].name)
    else:
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    return Distribution(name, "tensorflow", strategy=strategy, batch_shards=strategy.num_replicas_in_sync)


def _jax(name: str, devices: list | None, expert_axis_size: int | None) -> Distribution:
    import jax

    multi_process = initialize_jax_processes()
    if name == "one_device":
        return Distribution(name, "jax")
    devices = devices or keras.distribution.list_devices()
    if name == "auto":
        if len(devices) == 1 and not multi_process:
            return Distribution("default", "jax")
        name = "data_parallel"
    common = dict(num_workers=jax.process_count(), worker_index=jax.process_index(), is_chief=jax.process_index() == 0)
    if name == "data_parallel":
        distribution = keras.distribution.DataParallel(devices=devices)
        return Distribution(name, "jax", distribution=distribution, batch_shards=len(devices), **common)
    model = expert_axis_size or len(devices)
    if model < 1 or len(devices) % model:
        raise ValueError(
            f"`expert_axis_size` must divide the number of devices ({len(devices)}). "
            f"Received: expert_axis_size={expert_axis_size}"
        )
    mesh = keras.distribution.DeviceMesh((len(devices) // model, model), ["batch", "model"], devices=devices)
    distribution = keras.distribution.ModelParallel(layout_map=expert_layout_map(mesh), batch_dim_name="batch")
    return Distribution(name, "jax", distribution=distribution, batch_shards=len(devices) // model, **common)


def make_distribution(
    name: str | None = "auto",
    *,
    devices: list | None = None,
    expert_axis_size: int | None = None,
    apply_shims: bool = True,
) -> Distribution:
    """Builds the named strategy for the running Keras backend.

    Args:
        name: One of `STRATEGIES[backend]`; `None` means no distribution at all.
            `auto`: TensorFlow -> `multi_worker` when `TF_CONFIG` lists several
            tasks, `mirrored` with several GPUs, else none; JAX -> `data_parallel`
            with several devices or processes, else none; torch -> none.
        devices: JAX devices to use (default: all, over every process).
        expert_axis_size: `expert_parallel`: devices on the expert axis (default:
            all); the rest form the batch axis.
        apply_shims: Apply `kvlm.training.shims` for `multi_worker` (turn off only
            to check whether a Keras release still needs them).

    Raises:
        ValueError: For an unknown strategy or one that does not fit the backend.
    """
    backend = keras.backend.backend()
    if name is None:
        return Distribution("default", backend)
    _check_name(name, backend)
    if backend == "tensorflow":
        return _tensorflow(name, apply_shims)
    if backend == "jax":
        return _jax(name, devices, expert_axis_size)
    return Distribution("default", backend)
