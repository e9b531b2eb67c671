"""TensorFlow strategies: selection, MirroredStrategy over logical CPUs, multi-worker on localhost.

Multi-device runs happen in fresh processes (logical devices and TF_CONFIG must be
set before TensorFlow starts). Each run trains kvlm_tiny for 2 epochs of 4 global
batches of 32 with the same seed.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from distributed_runs import TINY, finish, free_port, max_weight_difference, run, start, worker_env

from kvlm.training import distribution, shims
from kvlm.training.distribution import make_distribution, tf_cluster_position, tf_config

pytestmark = pytest.mark.tensorflow_only

# Peak AdamW learning rate of the runs (TrainConfig default): one update moves a
# weight by at most about this much, so runs that agree to rounding stay well inside it.
PEAK_LR = 2e-3


def test_unknown_and_mismatched_strategies_name_the_problem():
    with pytest.raises(ValueError, match=r"Unknown strategy 'mirorred'.*'mirrored'"):
        make_distribution("mirorred")
    with pytest.raises(ValueError, match=r"'data_parallel' needs the jax backend.*runs on 'tensorflow'.*mirrored"):
        make_distribution("data_parallel")
    with pytest.raises(ValueError, match=r"'expert_parallel' needs the jax backend"):
        make_distribution("expert_parallel")


def test_single_machine_strategies():
    import tensorflow as tf

    one = make_distribution("one_device")
    assert isinstance(one.strategy, tf.distribute.OneDeviceStrategy)
    assert (one.batch_shards, one.is_chief, one.num_workers) == (1, True, 1)
    assert make_distribution(None).strategy is None
    auto = make_distribution("auto")  # no TF_CONFIG, no GPUs here
    assert (auto.name, auto.strategy) == ("default", None)


def test_tf_config_is_read_and_validated(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert tf_cluster_position() == (2, 1, False)
    with_chief = {"chief": ["127.0.0.1:3"], **cluster}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
    assert tf_cluster_position() == (3, 1, False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    assert tf_cluster_position() == (3, 0, True)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        tf_config()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 5}}))
    with pytest.raises(ValueError, match="not in its cluster"):
        tf_config()
    monkeypatch.delenv("TF_CONFIG")
    assert tf_config() is None and tf_cluster_position() == (1, 0, True)


def test_shims_are_gated_on_the_keras_version():
    assert shims.needed("3.15.1") and shims.needed("3.0.0")
    assert not shims.needed("3.16.0") and not shims.needed("2.15.0")
    assert shims.apply(version="3.99.0") == sorted(shims._applied)  # nothing new on an unaffected version
    with pytest.raises(ValueError, match="Unknown shims"):
        shims.apply(("nope",))


def test_shims_leave_single_worker_paths_to_keras():
    from keras.src.backend.tensorflow import trainer

    assert shims.apply() == ["reduce_per_replica", "symbolic_build"]
    assert trainer.reduce_per_replica.__kvlm_shim__ is not None
    # One worker (no multi-worker collective): the original Keras code runs unchanged.
    value = keras.ops.convert_to_tensor(1.5)
    assert trainer.reduce_per_replica(value, make_distribution("one_device").strategy, "auto") is value


def test_cli_strategy_choices_match_the_library():
    from kvlm.cli.train import strategy_choices

    assert set(strategy_choices()) == set(distribution.ALL_STRATEGIES)


@pytest.mark.slow
def test_mirrored_two_logical_cpus_matches_one_device(tmp_path):
    config = {**TINY, "output": str(tmp_path), "epochs": 2}
    one, mirrored = run(config, ["one_device", "mirrored"], worker_env("tensorflow"), "--cpu-devices", "2")
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    assert one["steps"] == mirrored["steps"] == 8
    # Same global batches: per-epoch losses agree to float32 rounding (rtol 1e-5) ...
    np.testing.assert_allclose(mirrored["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(mirrored["history"]["val_loss"], one["history"]["val_loss"], rtol=1e-5)
    assert mirrored["history"]["accuracy"] == one["history"]["accuracy"]
    # ... and so do the weights after 8 AdamW steps (measured: max 1.8e-5).
    largest, mean = max_weight_difference(one, mirrored)
    assert largest < 0.05 * PEAK_LR and mean < 1e-6, (largest, mean)


def _multi_worker(tmp_path, shim_option: str, count: int = 2):
    ports = [free_port() for _ in range(count)]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    config = {**TINY, "output": str(tmp_path), "epochs": 2}
    processes = [
        start(config, ["multi_worker"], worker_env(
            "tensorflow", TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        ), "--shims", shim_option)
        for i in range(count)
    ]
    return [finish(p, timeout=480) for p in processes]


@pytest.mark.slow
def test_multi_worker_two_processes_train_identically(tmp_path):
    results = _multi_worker(tmp_path / "workers", "all")
    for code, output, _ in results:
        assert code == 0, output[-4000:]
    chief, other = (summaries[0] for _, _, summaries in results)
    assert chief["workers"] == other["workers"] == 2 and chief["replicas"] == 2
    assert chief["output"] == str(tmp_path / "workers" / "multi_worker")
    assert other["output"] == str(tmp_path / "workers" / "multi_worker" / "workers" / "1")
    # Synchronous all-reduce: both workers log bit-identical metrics and end with equal weights.
    assert chief["history"] == other["history"] and chief["metrics"] == other["metrics"]
    assert max_weight_difference(chief, other) == (0.0, 0.0)
    # The global batch of 32 is split 16 + 16 over the workers: the same training as one device.
    (single,) = run({**TINY, "output": str(tmp_path / "single"), "epochs": 2}, ["one_device"], worker_env("tensorflow"))
    np.testing.assert_allclose(chief["history"]["loss"], single["history"]["loss"], rtol=1e-5)
    largest, mean = max_weight_difference(chief, single)
    assert largest < 0.05 * PEAK_LR and mean < 1e-6, (largest, mean)


@pytest.mark.slow  # Why each shim exists; rerun after a Keras upgrade (docs/training.md).
@pytest.mark.parametrize(
    "shim_option, error",
    [
        # Bug 1: the symbolic build reduces the whole (inputs, labels) PerReplica nest.
        ("none", "Attempt to convert a value ({'images': PerReplica"),
        # Bug 2 (with fix 1 only): scalar metrics reduced with axis=0.
        ("symbolic_build", "Invalid reduction dimension 0 for input with 0 dimensions"),
    ],
)
def test_multi_worker_fails_without_the_shims(tmp_path, shim_option, error):
    for code, output, summaries in _multi_worker(tmp_path, shim_option):
        assert code != 0 and not summaries
        assert error in output, output[-4000:]
