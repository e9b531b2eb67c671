"""Training callbacks: NaN guard, step limit, resumable backups and training-curve plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import keras
import numpy as np


class NonFiniteLossError(RuntimeError):
    """Raised by `NaNGuard` when the loss (or a weight) stops being finite."""


def _iterations(model: keras.Model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class StepCallback(keras.callbacks.Callback):
    """Tracks the global optimizer step without reading the model every batch.

    (On JAX, touching `self.model` mid-epoch syncs all training state back into
    the model, which Keras avoids for speed.)
    """

    def on_train_begin(self, logs=None):
        self.step = _iterations(self.model)
        self._epoch_start = self.step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._epoch_start + batch + 1


class NaNGuard(StepCallback):
    """Stops training at the first non-finite loss, before anything saves the broken weights.

    Put it first in the callback list (`kvlm.training.fit` does): it raises
    `NonFiniteLossError` from `on_train_batch_end`, so callbacks after it
    (BackupAndRestore, ModelCheckpoint) never see the step, and `on_epoch_end` /
    `on_train_end` do not run. It also checks the weights at each epoch end and
    every `check_weights_every` steps (set it to the backup frequency), which
    catches a finite loss computed just before a non-finite update.

    Args:
        checkpoint: Path of the last good checkpoint, named in the error message.
        monitor: The log entry to check every batch.
        check_weights_every: Also check the weights when the optimizer step is a
            multiple of this (None: at epoch ends only).
    """

    def __init__(self, checkpoint: str | Path | None = None, monitor: str = "loss",
                 check_weights_every: int | None = None):
        super().__init__()
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.monitor = monitor
        self.check_weights_every = check_weights_every
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch

    def _check_weights(self, batch: int | None) -> None:
        for weight in self.model.trainable_weights:
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(weight))):
                self._stop(f"weight {weight.path} became non-finite", batch)

    def _stop(self, what: str, batch: int | None) -> None:
        self.model.stop_training = True
        step = self.step
        where = f"epoch {self._epoch + 1}" + (f", batch {batch + 1}" if batch is not None else " end")
        kept = (
            f"The last good checkpoint is left untouched: {self.checkpoint}."
            if self.checkpoint and Path(self.checkpoint).exists()
            else "No checkpoint had been written yet."
        )
        raise NonFiniteLossError(
            f"Training stopped: {what} at {where} (optimizer step {step}). {kept} "
            "Lower the learning rate, check the input data for NaN/Inf, or resume from the last backup."
        )

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isfinite(float(value)):
            self._stop(f"the {self.monitor} became {float(value)}", batch)
        if self.check_weights_every and self.step % self.check_weights_every == 0:
            self._check_weights(batch)

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            if name.endswith(self.monitor) and not math.isfinite(float(value)):
                self._stop(f"{name} became {float(value)}", None)
        self._check_weights(None)


class StopAtStep(StepCallback):
    """Stops training once the optimizer has applied `steps` updates in total."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step >= self.steps:
            self.model.stop_training = True


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that resumes by optimizer step.

    Keras' callback counts epochs from 0 in a restarted process until the first
    epoch end (so a mid-epoch backup after a restore records epoch 0) and restarts
    the interrupted epoch from its first batch with mid-epoch weights. This one
    records the epoch from `on_epoch_begin` and, given `steps_per_epoch`, resumes
    at epoch `optimizer.iterations // steps_per_epoch`. `kvlm.training.fit` also
    starts the data stream at the restored step (`restored_step`), so a run
    continues exactly where its last backup was written.

    Args:
        backup_dir, save_freq, double_checkpoint, delete_checkpoint: As in Keras.
        steps_per_epoch: Steps in one epoch; None keeps Keras' epoch bookkeeping.
    """

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False, delete_checkpoint=True,
                 steps_per_epoch: int | None = None):
        super().__init__(backup_dir, save_freq, double_checkpoint, delete_checkpoint)
        self.steps_per_epoch = steps_per_epoch

    def _load_model(self):
        super()._load_model()
        if self.steps_per_epoch and Path(self._weights_path).exists():
            self.model._initial_epoch = _iterations(self.model) // self.steps_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch
        self._last_batch_seen = 0


def restored_step(model: keras.Model, backup_dir: str | Path) -> int:
    """Loads the backup in `backup_dir` (weights and optimizer) into `model`; returns its step.

    Returns 0 when there is no backup. The model and optimizer must be built.
    """
    weights = Path(backup_dir) / "latest.weights.h5"
    if not weights.exists():
        return 0
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(weights)
    return _iterations(model)


def read_history_csv(path: str | Path) -> dict[str, list[float]]:
    """Columns of a `keras.callbacks.CSVLogger` file (empty when missing)."""
    path = Path(path)
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    history: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "epoch" and value not in (None, ""):
                history.setdefault(key, []).append(float(value))
    return history


def plot_history(history: dict[str, list[float]], path: str | Path, title: str = "training") -> Path:
    """Writes loss and metric curves (training and `val_`) to a PNG with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [n for n in history if not n.startswith("val_") and n != "learning_rate"]
    names = sorted(names, key=lambda n: (n != "loss", n))
    figure = Figure(figsize=(5 * max(len(names), 1), 4))
    FigureCanvasAgg(figure)
    for i, name in enumerate(names):
        axes = figure.add_subplot(1, max(len(names), 1), i + 1)
        for key, style in ((name, "-o"), (f"val_{name}", "--s")):
            if history.get(key):
                values = history[key]
                axes.plot(range(1, len(values) + 1), values, style, label=key, markersize=3)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


class TrainingCurves(keras.callbacks.Callback):
    """Redraws `path` (PNG) with every epoch's logs at each epoch end.

    Args:
        path: Output PNG.
        history: Epochs logged before this run (e.g. `read_history_csv` on resume).
    """

    def __init__(self, path: str | Path, history: dict[str, list[float]] | None = None):
        super().__init__()
        self.path = Path(path)
        self.history = {k: list(v) for k, v in (history or {}).items()}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        plot_history(self.history, self.path, title=self.path.stem.replace("_", " "))
