"""SparseMoE training-step benchmark (TensorFlow backend, XLA-compiled fwd + bwd + SGD update).

All layers see the same tokens `(batch, seq, d_model)` and the same expert width;
every timing is the median of `--repeats` steps after `--warmup` steps, taken
round-robin over the cases, and all ratios (of median wall times) come from one
run so they share the machine's state. Compared:

1. kvlm SparseMoE, top-2, 64 experts vs 4 experts (the cost must not grow with E);
2. keras-hub's `MixtralSparseMoeBlock` (computes every expert on every token)
   vs kvlm SparseMoE, both 16 experts, top-2;
3. kvlm SparseMoE (16 experts, top-2) vs a dense FFN with the same active
   parameters (width `top_k * expert_width`).

Run: `python bench/moe.py` (writes bench/results/moe.json and moe.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import common

common.use_tensorflow(__file__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock  # noqa: E402
from kvlm.layers.moe import SparseMoE  # noqa: E402

TARGETS = {
    "ours_e64_over_ours_e4": ("<=", 1.5),
    "mixtral_e16_over_ours_e16": (">=", 4.0),
    "ours_e16_over_dense": ("<=", 1.5),
}


class DenseFFN(keras.layers.Layer):
    """Dense GELU FFN `d -> width -> d`."""

    def __init__(self, d_model: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(width, activation="gelu")
        self.outer = keras.layers.Dense(d_model)

    def call(self, x, training=None):
        return self.outer(self.inner(x))


def make_step(layer, x, unpack: bool = False, lr: float = 1e-3):
    """An XLA-compiled train step: forward, aux losses, gradients and SGD update."""
    layer(x[:1], training=True)  # build

    @tf.function(jit_compile=True)
    def step(inputs):
        with tf.GradientTape() as tape:
            y = layer(inputs, training=True)
            if unpack:
                y = y[0]
            loss = tf.reduce_mean(tf.square(y))
            if layer.losses:
                loss = loss + tf.add_n(layer.losses)
        variables = layer.trainable_variables
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads):
            v.assign_sub(lr * g)
        return loss

    return step


def time_steps(steps: dict, x, warmup: int, repeats: int) -> dict:
    """Times every step `repeats` times, interleaved round-robin so that load changes
    on a shared machine hit every case alike; reports wall and process CPU time."""
    results = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step(x).numpy()
        results[name] = {"first_call_s": time.perf_counter() - start, "times_s": [], "cpu_times_s": []}
        for _ in range(warmup):
            step(x).numpy()
    for _ in range(repeats):
        for name, step in steps.items():
            start, cpu = time.perf_counter(), time.process_time()
            step(x).numpy()
            results[name]["times_s"].append(time.perf_counter() - start)
            results[name]["cpu_times_s"].append(time.process_time() - cpu)
    for r in results.values():
        r.update(
            median_s=statistics.median(r["times_s"]), min_s=min(r["times_s"]), max_s=max(r["times_s"]),
            median_cpu_s=statistics.median(r["cpu_times_s"]),
        )
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-width", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: TF's default)")
    parser.add_argument("--output", default=str(common.RESULTS / "moe.json"))
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    keras.utils.set_random_seed(0)
    d, h, k = args.d_model, args.expert_width, args.top_k
    x = tf.constant(np.random.default_rng(0).normal(size=(args.batch, args.seq, d)).astype("float32"))
    num_tokens = args.batch * args.seq

    def ours(num_experts):
        return SparseMoE(num_experts, top_k=k, expert_hidden_dim=h, capacity_factor=args.capacity_factor)

    cases = {
        "ours_e4": (lambda: ours(4), False),
        "ours_e16": (lambda: ours(16), False),
        "ours_e64": (lambda: ours(64), False),
        "dense_ffn": (lambda: DenseFFN(d, k * h), False),
        "mixtral_e16": (
            lambda: MixtralSparseMoeBlock(hidden_dim=d, intermediate_dim=h, num_experts=16, top_k=k), True
        ),
    }
    steps, params = {}, {}
    for name, (factory, unpack) in cases.items():
        layer = factory()
        steps[name] = make_step(layer, x, unpack)
        params[name] = int(sum(np.prod(v.shape) for v in layer.trainable_variables))
    timings = time_steps(steps, x, args.warmup, args.repeats)
    for name, t in timings.items():
        t["params"] = params[name]
        print(f"{name:>12}: {t['median_s'] * 1e3:9.1f} ms wall, {t['median_cpu_s'] * 1e3:9.1f} ms CPU "
              f"(params {t['params']:,})", flush=True)

    def ratios_of(key):
        med = {name: t[key] for name, t in timings.items()}
        return {
            "ours_e64_over_ours_e4": med["ours_e64"] / med["ours_e4"],
            "mixtral_e16_over_ours_e16": med["mixtral_e16"] / med["ours_e16"],
            "ours_e16_over_dense": med["ours_e16"] / med["dense_ffn"],
            "ours_e4_over_dense": med["ours_e4"] / med["dense_ffn"],
            "ours_e64_over_dense": med["ours_e64"] / med["dense_ffn"],
        }

    ratios, cpu_ratios = ratios_of("median_s"), ratios_of("median_cpu_s")

    def met(value, op, bound):
        return value <= bound if op == "<=" else value >= bound

    checks = {
        name: {"ratio": ratios[name], "cpu_ratio": cpu_ratios[name], "target": f"{op} {bound}",
               "met": met(ratios[name], op, bound), "cpu_met": met(cpu_ratios[name], op, bound)}
        for name, (op, bound) in TARGETS.items()
    }
    result = {
        "benchmark": "SparseMoE train step (fwd+bwd+SGD), TensorFlow backend, tf.function(jit_compile=True)",
        "config": {
            "tokens": num_tokens, "batch": args.batch, "seq": args.seq, "d_model": d, "expert_width": h,
            "top_k": k, "capacity_factor": args.capacity_factor, "warmup": args.warmup, "repeats": args.repeats,
            "intra_op_threads": args.threads or "default",
            "dense_ffn_width": k * h,
            "mixtral": "keras_hub.src.models.mixtral.mixtral_decoder.MixtralSparseMoeBlock, SwiGLU experts "
                       "of intermediate_dim=expert_width (3 matrices; ours: 2-matrix GELU)",
        },
        "timings": timings,
        "ratios": ratios,
        "cpu_time_ratios": cpu_ratios,
        "checks": checks,
        "environment": {
            "keras": keras.__version__, "tensorflow": tf.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average_after": os.getloadavg(),
        },
    }
    output = Path(args.output)
    table = render_table(result)
    common.write_results(output.parent, output.stem, result, table)
    print(table)
    return result


def render_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# SparseMoE benchmark (TensorFlow, XLA train step)",
        "",
        f"{cfg['tokens']} tokens, d_model={cfg['d_model']}, expert width={cfg['expert_width']}, "
        f"top_k={cfg['top_k']}, capacity_factor={cfg['capacity_factor']}; median of {cfg['repeats']} "
        f"steps after {cfg['warmup']} warm-up steps. Load average after the run: "
        f"{', '.join(f'{v:.1f}' for v in result['environment']['load_average_after'])} "
        f"on {result['environment']['cpu_count']} CPUs.",
        "",
        "| layer | step, median (ms) | min (ms) | CPU time, median (ms) | trainable params |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in result["timings"].items():
        lines.append(
            f"| {name} | {t['median_s'] * 1e3:.1f} | {t['min_s'] * 1e3:.1f} | {t['median_cpu_s'] * 1e3:.1f} "
            f"| {t['params']:,} |"
        )
    lines += [
        "",
        "| ratio (median step times) | wall | CPU time | target | met (wall) |",
        "|---|---:|---:|---|---|",
    ]
    for name, c in result["checks"].items():
        lines.append(
            f"| {name} | {c['ratio']:.2f} | {c['cpu_ratio']:.2f} | {c['target']} | {'yes' if c['met'] else 'NO'} |"
        )
    for name in ("ours_e4_over_dense", "ours_e64_over_dense"):
        lines.append(
            f"| {name} | {result['ratios'][name]:.2f} | {result['cpu_time_ratios'][name]:.2f} | (info) | |"
        )
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Notes:",
    "",
    "- One step = forward, aux losses, gradients of all trainable weights and an SGD update, in one",
    "  `tf.function(jit_compile=True)`. Cases are timed round-robin; ratios use median wall times",
    "  (median process CPU times beside them). The CPU is shared with other jobs, so wall times",
    "  spread widely; the CPU-time ratios agree with the wall ratios.",
    "- ours E=64 vs E=4: routing and expert FLOPs are the same (E * capacity = 1.25 * top_k * tokens),",
    "  but E=64 has 16x the expert parameters (33.6M vs 2.1M). Forward and backward read every",
    "  expert matrix twice and write its gradient, then SGD reads both and writes the matrix: about",
    "  0.8 GB of memory traffic per step against 50 MB at E=4. That, more than routing (a few ms),",
    "  is the E-dependent part of the ratio, and it weighs more when the machine is quiet (min times).",
    "- Mixtral's block runs every expert on every token (SwiGLU, 3 matrices of the same width); ours",
    "  runs 2-matrix GELU experts on `capacity` slots only. Its cost grows with E, ours does not.",
    "- The dense FFN has width top_k * expert_width (the active parameters of one token); ours does",
    "  1.25x its expert FLOPs (capacity factor) plus routing, gather and combine.",
]


if __name__ == "__main__":
    main()
