"""Workarounds for two Keras 3 bugs that break `MultiWorkerMirroredStrategy` on TensorFlow.

Both live in `keras/src/backend/tensorflow/trainer.py` and only bite when
`tf.distribute.MultiWorkerMirroredStrategy` runs with more than one worker:

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from one batch of the
   distributed dataset by calling `strategy.reduce("MEAN", batch, axis=None)` on the
   whole `(inputs, labels)` structure. `CollectiveAllReduceExtended._reduce_to`
   handles one value, not a nest, and fails with "Attempt to convert a value
   (PerReplica:{...}) with an unsupported type ... to a Tensor" (MirroredStrategy's
   `_reduce_to` maps over the nest, so single-machine training works). The fix
   builds from this worker's first local replica batch: only shapes and dtypes
   matter there, and no cross-worker collective is needed.
2. `reduce_per_replica` reduces every train/test step's metric values with
   `strategy.reduce("MEAN", v, axis=0)` (and `strategy.reduce("SUM", v)` with no
   `axis`) in multi-worker mode. Metric results are scalars, so `axis=0` fails
   with "Invalid reduction dimension 0 for input with 0 dimensions". The fix
   reduces across replicas only (`axis=None`), which is what the single-worker
   branch does with `tf.reduce_mean(local_results, axis=0)`.

`apply()` patches both, only on the Keras versions known to have the bugs
(`AFFECTED`); other paths (one worker, MirroredStrategy, other backends) call the
original Keras code unchanged. tests/training/test_distribution_tf.py shows that
two worker processes fail without each patch and train identically with both.
"""

from __future__ import annotations

import functools

import keras

# Keras versions [first, last) verified to need the patches; re-check on upgrade by
# running tests/training/test_distribution_tf.py -m slow.
AFFECTED = ((3, 0), (3, 16))
PATCHES = ("symbolic_build", "reduce_per_replica")
_applied: set[str] = set()


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def needed(version: str | None = None) -> bool:
    """Whether this Keras version (default: the installed one) has the multi-worker bugs."""
    first, last = AFFECTED
    return first <= _version_tuple(version or keras.version()) < last


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    missing = [n for n in ("reduce_per_replica", "_collective_all_reduce_multi_worker") if not hasattr(trainer, n)]
    if missing or not hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build"):
        raise RuntimeError(
            f"keras {keras.version()} moved the TensorFlow trainer internals that kvlm.training.shims "
            f"patches (missing {missing or ['TensorFlowTrainer._maybe_symbolic_build']}); update the shims."
        )
    return trainer


def patch_symbolic_build() -> None:
    """Fix 1: symbolic build from the first local replica's batch under multi-worker."""
    import tensorflow as tf
    from keras.src import tree

    trainer = _trainer_module()
    original = trainer.TensorFlowTrainer._maybe_symbolic_build

    @functools.wraps(original)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not trainer._collective_all_reduce_multi_worker(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            batch = next(batches)
            break
        local = tree.map_structure(
            lambda v: strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v,
            batch,
        )
        return original(self, iterator=None, data_batch=local)

    _maybe_symbolic_build.__kvlm_shim__ = original
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


def patch_reduce_per_replica() -> None:
    """Fix 2: multi-worker "mean"/"sum" reduce across replicas only (`axis=None`)."""
    from keras.src import tree

    trainer = _trainer_module()
    original = trainer.reduce_per_replica

    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean", "sum") and trainer._collective_all_reduce_multi_worker(strategy):
            op = "SUM" if reduction == "sum" else "MEAN"
            return tree.map_structure(lambda v: strategy.reduce(op, v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.__kvlm_shim__ = original
    trainer.reduce_per_replica = reduce_per_replica


def apply(patches: tuple[str, ...] = PATCHES, version: str | None = None) -> list[str]:
    """Applies the named patches if this Keras needs them; returns the ones now active.

    Idempotent. A Keras version outside `AFFECTED` gets none.
    """
    unknown = set(patches) - set(PATCHES)
    if unknown:
        raise ValueError(f"Unknown shims {sorted(unknown)}. Shims: {list(PATCHES)}")
    if keras.backend.backend() != "tensorflow" or not needed(version):
        return sorted(_applied)
    for name in patches:
        if name not in _applied:
            {"symbolic_build": patch_symbolic_build, "reduce_per_replica": patch_reduce_per_replica}[name]()
            _applied.add(name)
    return sorted(_applied)
