"""JAX distribution: DataParallel over host devices, multi-process, expert parallelism.

These run in the JAX pass of scripts/test.sh only. Multi-device runs use fresh
processes with `XLA_FLAGS=--xla_force_host_platform_device_count=4` (JAX reads it
once, at start-up); multi-process runs join through `keras.distribution.initialize`
with the `KERAS_DISTRIBUTION_*` variables on 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from distributed_runs import ROOT, TINY, finish, free_port, max_weight_difference, run, start, worker_env

from kvlm.training.distribution import expert_layout_map, make_distribution

pytestmark = [
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX distribution: runs in the JAX pass"),
    pytest.mark.long,
]

FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
PEAK_LR = 2e-3  # TrainConfig's peak AdamW learning rate: about the most one update moves a weight.


def test_tensorflow_strategies_are_refused_on_jax():
    with pytest.raises(ValueError, match=r"'mirrored' needs the tensorflow backend.*'jax'.*data_parallel"):
        make_distribution("mirrored")
    with pytest.raises(ValueError, match=r"'multi_worker' needs the tensorflow backend"):
        make_distribution("multi_worker")
    assert make_distribution("one_device").distribution is None


def test_expert_parallel_needs_a_model_with_experts(tmp_path):
    from kvlm.training import TrainConfig, fit

    with pytest.raises(ValueError, match=r"'expert_parallel' shards SparseMoE experts, but this model has none"):
        fit(TrainConfig(output=str(tmp_path), epochs=1, **TINY), strategy="expert_parallel", verbose=0)


def test_expert_layout_map_selects_only_stacked_expert_weights():
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], devices=keras.distribution.list_devices()[:1])
    layouts = expert_layout_map(mesh)
    for path in (
        "fusion_block_1/moe_1/experts/inner_kernel", "fusion_block_3/moe_3/experts/outer_kernel", "sparse_moe/inner_kernel",
    ):
        assert layouts[path].axes == ("model", None, None), path
    for path in ("fusion_block_1/moe_1/experts/inner_bias", "moe/outer_bias"):
        assert layouts[path].axes == ("model", None), path
    # The float32 router ("router_kernel" ends in "outer_kernel"!), dense FFNs and the
    # shared expert stay replicated.
    for path in (
        "fusion_block_1/moe_1/router_kernel", "fusion_block_0/ffn/inner/kernel",
        "fusion_block_1/moe_1/shared_expert/inner/kernel", "fusion_block_1/moe_1/expert_load",
    ):
        assert layouts[path] is None, path


@pytest.mark.parametrize("model", [2, pytest.param(4, marks=pytest.mark.slow)], ids=["mesh_2x2", "mesh_1x4"])
def test_expert_parallel_shards_expert_weights_and_matches_unsharded(model):
    """A backbone with moe={"experts": 4, "top_k": 2} on 4 devices, expert axis `model`: 2 (a 2x2
    mesh, both axes sharded) or 4 (1x4, one expert per device)."""
    worker = Path(__file__).with_name("expert_parallel_worker.py")
    result = subprocess.run(
        [sys.executable, str(worker), str(model)], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=worker_env("jax", XLA_FLAGS=FOUR_DEVICES),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(runs) == 1, result.stdout[-3000:]
    run_result, batch = runs[0], 4 // model
    assert run_result["mesh"] == {"batch": batch, "model": model}
    assert run_result["batch_shards"] == batch
    variables = run_result["variables"]
    per_device = 4 // model
    for name, tail in (("inner_kernel", [32, 48]), ("outer_kernel", [48, 32]), ("inner_bias", [48])):
        info = variables[f"fusion_block_1/moe_1/experts/{name}"]
        assert info["shape"] == [4, *tail]
        assert info["spec"] == ["model"] + [None] * len(tail)
        shards = info["shards"]
        assert sorted(device for device, _, _ in shards) == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
        assert all(shape == [per_device, *tail] for _, shape, _ in shards)
        # Each device holds a contiguous block of experts; the blocks cover all 4.
        assert sorted({start for _, _, start in shards}) == list(range(0, 4, per_device))
    router = variables["fusion_block_1/moe_1/router_kernel"]
    assert router["spec"] == [None, None] and all(shape == [32, 4] for _, shape, _ in router["shards"])
    assert run_result["weights_equal"]
    assert run_result["max_output_difference"] <= 1e-5 * run_result["output_scale"], run_result


@pytest.mark.slow
def test_data_parallel_four_devices_matches_one_device(tmp_path):
    config = {**TINY, "output": str(tmp_path), "epochs": 2}
    one, parallel = run(config, ["one_device", "data_parallel"], worker_env("jax", XLA_FLAGS=FOUR_DEVICES))
    assert (one["replicas"], parallel["replicas"]) == (1, 4)
    assert one["steps"] == parallel["steps"] == 8
    np.testing.assert_allclose(parallel["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    # Held-out loss after 8 steps: the weights differ by up to ~6e-4, so rtol 1e-4 (measured 1.4e-5).
    np.testing.assert_allclose(parallel["history"]["val_loss"], one["history"]["val_loss"], rtol=1e-4)
    # Measured: max 5.9e-4 (a few Adam steps on near-zero gradients flip sign), mean ~1e-6.
    largest, mean = max_weight_difference(one, parallel)
    assert largest < 0.5 * PEAK_LR and mean < 1e-5, (largest, mean)


@pytest.mark.slow
def test_expert_parallel_training_matches_one_device(tmp_path):
    config = {**TINY, "output": str(tmp_path), "epochs": 1, "overrides": {"moe": {"experts": 4, "top_k": 2}}}
    one, sharded = run(
        config, ["one_device", "expert_parallel"], worker_env("jax", XLA_FLAGS=FOUR_DEVICES),
        "--expert-axis-size", "2",
    )
    assert sharded["replicas"] == 2  # 2 (batch) x 2 (experts) mesh
    np.testing.assert_allclose(sharded["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    largest, mean = max_weight_difference(one, sharded)
    assert largest < 0.5 * PEAK_LR and mean < 1e-5, (largest, mean)


@pytest.mark.slow
def test_two_processes_join_with_keras_distribution_initialize(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    config = {**TINY, "output": str(tmp_path / "cluster"), "epochs": 2}
    processes = [
        start(config, ["data_parallel"], worker_env(
            "jax", KERAS_DISTRIBUTION_JOB_ADDRESSES=address, KERAS_DISTRIBUTION_NUM_PROCESSES="2",
            KERAS_DISTRIBUTION_PROCESS_ID=str(i),
        ))
        for i in range(2)
    ]
    results = [finish(p, timeout=480) for p in processes]
    for code, output, _ in results:
        assert code == 0, output[-4000:]
    first, second = (summaries[0] for _, _, summaries in results)
    assert first["workers"] == second["workers"] == 2 and first["replicas"] == 2
    assert second["output"].endswith("workers/1")
    assert first["history"] == second["history"] and first["metrics"] == second["metrics"]
    assert max_weight_difference(first, second) == (0.0, 0.0)
    # One process per half of each global batch: the same training as one device.
    (single,) = run({**TINY, "output": str(tmp_path / "single"), "epochs": 2}, ["one_device"], worker_env("jax"))
    np.testing.assert_allclose(first["history"]["loss"], single["history"]["loss"], rtol=1e-5)
    largest, mean = max_weight_difference(first, single)
    assert largest < 0.5 * PEAK_LR and mean < 1e-5, (largest, mean)
