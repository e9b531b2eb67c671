"""Helpers for the distribution tests: run `fit_worker.py` in fresh processes and compare runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("fit_worker.py")
ROOT = Path(__file__).resolve().parents[2]
# 128 training examples in global batches of 32: 4 steps an epoch.
TINY = {"train_size": 128, "eval_size": 16, "batch_size": 32, "vocabulary_size": 200}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(backend: str, **extra: str) -> dict[str, str]:
    """This process's environment without its distribution settings, plus `extra`. XLA flags other
    than the host device count are kept, and `extra`'s XLA_FLAGS are added to them."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("KERAS_DISTRIBUTION_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags += extra.pop("XLA_FLAGS", "").split()
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), XLA_FLAGS=" ".join(flags), **extra)
    return env


def start(config: dict, strategies: list[str], env: dict[str, str], *args: str) -> subprocess.Popen:
    command = [sys.executable, str(WORKER), "--config", json.dumps(config)]
    for name in strategies:
        command += ["--strategy", name]
    return subprocess.Popen(
        [*command, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, list[dict]]:
    """Waits; returns `(returncode, output, summaries)`."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"worker timed out:\n{output[-4000:]}") from None
    summaries = [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]
    return process.returncode, output, summaries


def run(config: dict, strategies: list[str], env: dict[str, str], *args: str) -> list[dict]:
    code, output, summaries = finish(start(config, strategies, env, *args))
    assert code == 0, output[-4000:]
    return summaries


def weights(summary: dict) -> list[np.ndarray]:
    data = np.load(Path(summary["output"]) / "weights.npz")
    return [data[f"arr_{i}"] for i in range(len(data.files))]


def max_weight_difference(a: dict, b: dict) -> tuple[float, float]:
    """`(max, mean)` absolute difference over all final weights of two runs."""
    wa, wb = weights(a), weights(b)
    assert [w.shape for w in wa] == [w.shape for w in wb]
    diffs = np.concatenate([np.abs(x - y).ravel() for x, y in zip(wa, wb)])
    return float(diffs.max()), float(diffs.mean())
