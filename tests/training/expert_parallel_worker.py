"""Builds a MoE backbone unsharded and expert-parallel (JAX, 4 host devices); prints the sharding.

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/training/expert_parallel_worker.py EXPERT_AXIS_SIZE [EXPERT_AXIS_SIZE ...]

Prints one `RESULT <json>` line per expert-axis size: the mesh, each MoE variable's
PartitionSpec and per-device shards, and the largest output difference between the
sharded and the unsharded model.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np

from kvlm.models import VLMBackbone
from kvlm.training import make_distribution

BACKBONE = dict(
    vocabulary_size=60, image_size=32, encoder="cnn", hidden_dim=32, num_heads=2, intermediate_dim=64,
    num_fusion_layers=2, moe={"experts": 4, "top_k": 2, "expert_hidden_dim": 48},
)


def main(expert_axis_size: int) -> None:
    rng = np.random.default_rng(0)
    inputs = {
        "images": rng.random((8, 32, 32, 3), dtype=np.float32),
        "token_ids": rng.integers(1, 60, (8, 16)).astype("int32"),
    }
    keras.utils.set_random_seed(0)
    reference = VLMBackbone(**BACKBONE)
    expected = keras.ops.convert_to_numpy(reference(inputs, training=False)["sequence_output"])

    distribution = make_distribution("expert_parallel", expert_axis_size=expert_axis_size)
    with distribution.scope():
        sharded = VLMBackbone(**BACKBONE)
        sharded.set_weights(reference.get_weights())
        output = keras.ops.convert_to_numpy(sharded(inputs, training=False)["sequence_output"])
    variables = {}
    for variable in sharded.weights:
        if "moe" in variable.path:
            value = variable.value
            variables[variable.path] = {
                "shape": list(variable.shape),
                "spec": [axis for axis in value.sharding.spec],
                "shards": sorted(
                    [[str(s.device), list(s.data.shape), int((s.index[0].start or 0) if s.index else 0)] for s in value.addressable_shards]
                ),
            }
    weights_equal = all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(reference.weights, sharded.weights)
    )
    print("RESULT " + json.dumps({
        "mesh": dict(zip(distribution.distribution.device_mesh.axis_names, distribution.distribution.device_mesh.shape)),
        "batch_shards": distribution.batch_shards,
        "variables": variables,
        "weights_equal": weights_equal,
        "max_output_difference": float(np.abs(output - expected).max()),
        "output_scale": float(np.abs(expected).max()),
    }), flush=True)


if __name__ == "__main__":
    for size in sys.argv[1:]:
        main(int(size))
