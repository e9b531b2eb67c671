"""Runs `kvlm.training.fit` in a fresh process for the distribution and fault-tolerance tests.

    python tests/training/fit_worker.py --config '{"output": ...}' --strategy mirrored \
        [--strategy one_device ...] [--cpu-devices 2] [--shims none|symbolic_build|all] \
        [--backup-freq 3] [--pause-at-step 7] [--expert-axis-size 2]

Set KERAS_BACKEND (and XLA_FLAGS / TF_CONFIG / KERAS_DISTRIBUTION_*) in the environment.
Each strategy trains into `<output>/<strategy>`; the final weights go to
`<output>/<strategy>/weights.npz` and a line `RESULT <json summary>` is printed.
With `--pause-at-step K` the run prints `PAUSED` after step K and sleeps (to be killed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--strategy", action="append", default=[])
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--shims", default="all", choices=["none", "symbolic_build", "all"])
    parser.add_argument("--backup-freq", default=None)
    parser.add_argument("--pause-at-step", type=int, default=None)
    parser.add_argument("--expert-axis-size", type=int, default=None)
    args = parser.parse_args()

    import keras
    import numpy as np

    from kvlm.training import TrainConfig, fit, make_distribution
    from kvlm.training.callbacks import StepCallback
    from kvlm.training.distribution import configure_cpu_devices

    if args.cpu_devices and keras.backend.backend() == "tensorflow":
        configure_cpu_devices(args.cpu_devices)
    if args.shims == "symbolic_build":
        from kvlm.training import shims

        shims.apply(("symbolic_build",))

    class PauseAt(StepCallback):
        def on_train_batch_end(self, batch, logs=None):
            super().on_train_batch_end(batch, logs)
            if self.step == args.pause_at_step:
                print("PAUSED", flush=True)
                time.sleep(3600)

    base = json.loads(args.config)
    backup_freq = None if args.backup_freq is None else (
        args.backup_freq if args.backup_freq == "epoch" else int(args.backup_freq)
    )
    for name in args.strategy or ["auto"]:
        config = TrainConfig(**{**base, "output": str(Path(base["output"]) / name)})
        distribution = make_distribution(
            None if name == "none" else name, expert_axis_size=args.expert_axis_size,
            apply_shims=args.shims == "all",
        )
        callbacks = [PauseAt()] if args.pause_at_step else []
        summary = fit(config, strategy=distribution, callbacks=callbacks, verbose=0, backup_freq=backup_freq)
        model = keras.saving.load_model(Path(summary["output"]) / "model.keras")
        np.savez(Path(summary["output"]) / "weights.npz", *[keras.ops.convert_to_numpy(w) for w in model.weights])
        print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
