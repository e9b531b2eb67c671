"""What the benchmark scripts share: the TensorFlow setup, the training options, the machine and the results files.

The scripts run as `python bench/<name>.py`, so `bench/` is on `sys.path` and they `import common`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Interleaved timing rounds of `batch_ms`.
COST_ROUNDS = 30

# The options several benchmarks take, with their types (the defaults are each script's own).
TRAINING_OPTIONS = {
    "train_size": {"type": int},
    "held_out_size": {"type": int},
    "eval_size": {"type": int},
    "epochs": {"type": int},
    "batch_size": {"type": int},
    "learning_rate": {"type": float},
    "encoder": {"choices": ("cnn", "vit")},
    "seed": {"type": int},
    "output": {},
}


def use_tensorflow(script: str) -> None:
    """Selects the TensorFlow backend, quiets its C++ logs, puts the repository on `sys.path` and
    lists the devices the way the kvlm CLI does (without the expected cuInit line on CPU-only machines).

    Call it before importing keras. Exits when `KERAS_BACKEND` names another backend.
    """
    if os.environ.setdefault("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.exit(f"bench/{Path(script).name} runs on the TensorFlow backend: "
                 "unset KERAS_BACKEND or set it to tensorflow.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    from kvlm.cli.device_probe import probe_devices

    probe_devices()


def training_parser(doc: str, **defaults: object) -> argparse.ArgumentParser:
    """A parser described by the first line of `doc` (the script's docstring), with the options
    of `TRAINING_OPTIONS` named in `defaults` (`train_size=...` adds `--train-size`), in that order."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default, **TRAINING_OPTIONS[name])
    return parser


def machine() -> str:
    """The machine in one line: architecture, CPU count and Python version."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def record(script: str, args: argparse.Namespace, argv: list[str] | None, body: dict, start: float) -> dict:
    """A run's results: its command and options (all but `--output`), `body`, then the Keras backend,
    the machine and the seconds since `start` (a `time.perf_counter()` reading)."""
    import keras

    return {
        "command": "python " + " ".join([f"bench/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        **body,
        "keras_backend": keras.backend.backend(),
        "machine": machine(),
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def write_results(output_dir: str | Path, name: str, result: dict, markdown: str) -> Path:
    """Writes `result` to `output_dir/name.json` and `markdown` to `name.md` beside it; returns the JSON path."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (output / f"{name}.md").write_text(markdown, encoding="utf-8")
    return path


def batch_ms(runs: dict, rounds: int = COST_ROUNDS) -> dict[str, float]:
    """Median milliseconds of one compiled forward pass per `{name: (model, inputs)}`, rounds interleaved."""
    import numpy as np
    import tensorflow as tf

    calls = {name: (tf.function(lambda x, m=model: m(x, training=False)), inputs) for name, (model, inputs) in runs.items()}
    times = {name: [] for name in runs}
    for call, inputs in calls.values():
        call(inputs)  # trace
    for _ in range(rounds):
        for name, (call, inputs) in calls.items():
            start = time.perf_counter()
            np.asarray(call(inputs))
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: float(np.median(t)) for name, t in times.items()}
