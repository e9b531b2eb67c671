"""Training throughput versus devices and workers (TF mirrored / multi-worker, JAX data parallel).

Each configuration trains kvlm_tiny (CNN encoder) on procedural shapes data with
`kvlm.training.fit` in fresh processes, with a fixed global batch (strong
scaling), and times the steady-state steps after a warm-up (tracing and XLA
compilation excluded). Examples/s = global batch x measured steps / seconds,
input pipeline included.

On a CPU-only machine the devices are logical: TensorFlow splits the CPU into N
logical devices, JAX gets `--xla_force_host_platform_device_count=N`, workers are
processes on 127.0.0.1. They all share the same cores, so no speed-up is expected
there; the numbers show the overhead of the distribution machinery. On a GPU host
pass `--gpus` to use real devices (CUDA_VISIBLE_DEVICES picks the first N GPUs;
each worker process gets its own GPU).

Usage:
    python bench/scaling.py                    # CPU: 1, 2, 4 logical devices; 1, 2 workers
    python bench/scaling.py --gpus --devices 1 2 4 8 --workers 1 2 --batch-size 256
Writes bench/results/scaling.json and scaling.md (pass --output to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    """One training process: prints `RESULT {json}` with the timed steps."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from kvlm.training import TrainConfig, fit, make_distribution
    from kvlm.training.callbacks import StepCallback
    from kvlm.training.distribution import configure_cpu_devices

    if args.cpu_devices and keras.backend.backend() == "tensorflow":
        configure_cpu_devices(args.cpu_devices)
    distribution = make_distribution(args.strategy)

    class Timer(StepCallback):
        def on_train_batch_end(self, batch, logs=None):
            super().on_train_batch_end(batch, logs)
            if self.step in (args.warmup, args.warmup + args.steps):
                float(logs["loss"])  # wait for the step (JAX dispatches asynchronously)
                setattr(self, "start" if self.step == args.warmup else "end", time.perf_counter())

    timer = Timer()
    steps = args.warmup + args.steps
    config = TrainConfig(
        output=args.output, train_size=steps * args.batch_size, eval_size=max(64, 8 * distribution.batch_shards),
        epochs=1, batch_size=args.batch_size, vocabulary_size=200, seed=0,
    )
    summary = fit(config, strategy=distribution, callbacks=[timer], verbose=0, checkpoint=False)
    seconds = timer.end - timer.start
    print("RESULT " + json.dumps({
        "strategy": summary["strategy"], "replicas": summary["replicas"], "workers": summary["workers"],
        "measured_steps": args.steps, "seconds": seconds,
        "examples_per_second": args.steps * args.batch_size / seconds,
    }), flush=True)


def _command(args, backend: str, strategy: str, output: Path, cpu_devices: int | None) -> list[str]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--backend", backend, "--strategy", strategy,
        "--output", str(output), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
        "--steps", str(args.steps),
    ]
    return command + (["--cpu-devices", str(cpu_devices)] if cpu_devices else [])


def _env(backend: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")
           and not k.startswith("KERAS_DISTRIBUTION_")}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(common.ROOT), **extra)
    return env


def _launch(commands: list[tuple[list[str], dict]], timeout: float) -> list[dict]:
    processes = [
        subprocess.Popen(c, env=e, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c, e in commands
    ]
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if process.returncode or not lines:
            raise RuntimeError(f"benchmark worker failed ({process.returncode}):\n{output[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _gpus(n: int) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n))}


def scenarios(args, scratch: Path):
    """(backend, label, devices, workers, [(command, env)]) for every configuration."""
    for backend in args.backends:
        for n in args.devices:
            strategy = "one_device" if n == 1 else ("mirrored" if backend == "tensorflow" else "data_parallel")
            out = scratch / f"{backend}-{strategy}-{n}"
            if args.gpus:
                env, cpu = _env(backend, **_gpus(n)), None
            elif backend == "jax":
                env, cpu = _env(backend, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"), None
            else:
                env, cpu = _env(backend), n
            yield backend, strategy, n, 1, [(_command(args, backend, strategy, out, cpu), env)]
        for count in (w for w in args.workers if w > 1):
            out = scratch / f"{backend}-workers-{count}"
            commands = []
            if backend == "tensorflow":
                cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(count)]}
                for i in range(count):
                    extra = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
                    extra |= {"CUDA_VISIBLE_DEVICES": str(i)} if args.gpus else {}
                    commands.append((_command(args, backend, "multi_worker", out, None), _env(backend, **extra)))
                yield backend, "multi_worker", count, count, commands
            else:
                address = f"127.0.0.1:{_free_port()}"
                for i in range(count):
                    extra = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": address, "KERAS_DISTRIBUTION_NUM_PROCESSES": str(count),
                             "KERAS_DISTRIBUTION_PROCESS_ID": str(i)}
                    extra |= {"CUDA_VISIBLE_DEVICES": str(i)} if args.gpus else {}
                    commands.append((_command(args, backend, "data_parallel", out, None), _env(backend, **extra)))
                yield backend, "data_parallel (multi-process)", count, count, commands


def markdown(report: dict) -> str:
    machine, rows = report["machine"], report["results"]
    lines = [
        "# Training scaling benchmark",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['platform']}), {machine['accelerators']}; load average "
        f"{machine['load_before']} before, {machine['load_after']} after. Model: kvlm_tiny (CNN encoder), "
        f"global batch {report['batch_size']} (fixed: strong scaling), {report['warmup']} warm-up + "
        f"{report['steps']} timed steps of `kvlm.training.fit` including the tf.data input pipeline.",
        "",
        f"Each configuration ran {report['repeats']} times, round-robin; the table shows the median and every run.",
        "",
        "| backend | strategy | devices | workers | examples/s (median) | runs | vs 1 device |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = ", ".join(f"{x:.0f}" for x in row["runs_examples_per_second"])
        lines.append(
            f"| {row['backend']} | {row['strategy']} | {row['devices']} | {row['workers']} | "
            f"{row['examples_per_second']:.1f} | {runs} | {row['speedup']:.2f}x |"
        )
    lines += ["", *report["notes"], "", f"Command: `{report['command']}`", "", "On a multi-GPU host:", ""]
    lines += [f"    {c}" for c in report["gpu_commands"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="tensorflow", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help="results folder (default bench/results)")
    parser.add_argument("--cpu-devices", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"], choices=["tensorflow", "jax"])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--gpus", action="store_true", help="use real GPUs instead of logical CPU devices")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="runs of every configuration (median reported)")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import tempfile

    results_dir = Path(args.output or common.RESULTS)
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        # Round-robin over the configurations, so a change in machine load hits them all alike.
        for repeat in range(args.repeats):
            for backend, strategy, devices, workers, commands in scenarios(args, Path(scratch) / str(repeat)):
                runs = _launch(commands, args.timeout)
                # Synchronous training: every worker times the same steps; count the slowest.
                rate = min(r["examples_per_second"] for r in runs)
                row = rows.setdefault((backend, strategy, devices, workers), {
                    "backend": backend, "strategy": strategy, "devices": devices, "workers": workers,
                    "replicas": runs[0]["replicas"], "runs_examples_per_second": [],
                })
                row["runs_examples_per_second"].append(rate)
                print(f"{backend:>10} {strategy:>30} devices={devices} workers={workers}: {rate:.1f} examples/s",
                      flush=True)
    results = list(rows.values())
    for row in results:
        row["examples_per_second"] = float(statistics.median(row["runs_examples_per_second"]))
    for row in results:
        base = next(r for r in results if r["backend"] == row["backend"] and r["devices"] == 1 and r["workers"] == 1)
        row["speedup"] = row["examples_per_second"] / base["examples_per_second"]
    accelerators = "GPUs: " + os.environ.get("CUDA_VISIBLE_DEVICES", "all visible") if args.gpus else "no GPU"
    notes = [
        "Logical devices and localhost workers share the same CPU cores, so on a CPU-only machine no speed-up "
        "is expected: each step does the same arithmetic on the same cores plus gradient all-reduce, "
        "per-device dispatch and (for workers) gRPC/Gloo collectives, so lower numbers measure that overhead. "
        "Real speed-ups need one GPU (or host) per replica.",
    ] if not args.gpus else ["Each replica is one GPU; workers are processes on this host, one GPU each."]
    report = {
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "accelerators": accelerators, "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "results": results, "notes": notes,
        "command": ("python bench/scaling.py " + " ".join(sys.argv[1:])).strip(),
        "gpu_commands": [
            "python bench/scaling.py --gpus --devices 1 2 4 8 --workers 1 2 --batch-size 256 --steps 50",
            "# one worker per host instead: set TF_CONFIG (TensorFlow) or KERAS_DISTRIBUTION_* (JAX) on each host",
            "# and run `kvlm train --strategy multi_worker` / `--strategy data_parallel` there (docs/training.md).",
        ],
    }
    path = common.write_results(results_dir, "scaling", report, markdown(report))
    print(f"wrote {path} and scaling.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
