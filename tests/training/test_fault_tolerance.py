"""Fault tolerance: resume after SIGKILL from the last backup, and the NaN guard.

Run on the current Keras backend (each pass of scripts/test.sh).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
from distributed_runs import TINY, finish, max_weight_difference, start, worker_env
from keras import ops

from kvlm.training import BackupAndRestore, NaNGuard, NonFiniteLossError, TrainConfig, fit


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for_line(process, text: str, timeout: float) -> list[str]:
    """Reads `process.stdout` until a line equals `text`; returns the lines read."""
    lines: list[str] = []

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.strip() == text:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[-1].strip() == text, "".join(lines)[-4000:]
    return lines


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_last_backup_with_identical_weights(tmp_path):
    # 3 epochs of 4 steps, a backup every 3 steps. The first attempt is killed after
    # step 7 (epoch 2, batch 3): its last backup is step 6, inside the interrupted epoch.
    backend = keras.backend.backend()
    config = {**TINY, "epochs": 3}
    args = ("--backup-freq", "3")
    reference = start({**config, "output": str(tmp_path / "reference")}, ["auto"], worker_env(backend), *args)
    attempt = start({**config, "output": str(tmp_path / "run")}, ["auto"], worker_env(backend), *args,
                    "--pause-at-step", "7")
    _wait_for_line(attempt, "PAUSED", timeout=480)
    os.kill(attempt.pid, signal.SIGKILL)
    attempt.wait(timeout=60)
    assert attempt.returncode == -signal.SIGKILL

    run_dir = tmp_path / "run" / "auto"
    backup = run_dir / "backup"
    assert not (run_dir / "model.keras").exists()
    assert json.loads((backup / "training_metadata.json").read_text()) == {"epoch": 1, "batch": 1}

    results = [finish(start({**config, "output": str(tmp_path / "run")}, ["auto"], worker_env(backend), *args)),
               finish(reference)]
    for code, output, _ in results:
        assert code == 0, output[-4000:]
    (resumed,), (uninterrupted,) = (summaries for _, _, summaries in results)

    steps_per_epoch = 4
    assert resumed["resumed_from_step"] == 6  # the last backup, not the start of the run
    assert resumed["resumed_from_step"] >= steps_per_epoch  # lost less than the interrupted epoch
    assert resumed["steps"] == uninterrupted["steps"] == 12
    assert len(resumed["history"]["loss"]) == 2 and len(uninterrupted["history"]["loss"]) == 3
    # Same steps on the same batches in the same order: the same final weights.
    largest, _ = max_weight_difference(resumed, uninterrupted)
    assert largest <= 1e-6, largest
    np.testing.assert_allclose(resumed["metrics"]["loss"], uninterrupted["metrics"]["loss"], rtol=1e-5)
    assert not backup.exists()  # removed once training finished


@pytest.mark.backend_independent  # a tf.data stream
def test_training_stream_restarts_at_any_step(tokenizer, shapes_examples):
    from kvlm.data import answer_vocabulary, make_dataset
    from kvlm.training.loop import training_stream

    examples, answers = shapes_examples[:40], answer_vocabulary(shapes_examples)

    def one_pass(seed):
        return make_dataset(examples, tokenizer, answers, 32, 16, shuffle=True, seed=seed)

    def labels(first_pass=0, skip=0, count=9):
        stream = training_stream(one_pass, seed=3, first_pass=first_pass)
        for _ in range(2):  # iterators opened and dropped before (as Keras does) change nothing
            next(iter(stream))
        return [batch[1].numpy().tolist() for batch in stream.skip(skip).take(count)]

    full = labels()
    assert [len(b) for b in full] == [16, 16, 8] * 3  # 40 examples: 3 batches a pass
    assert full[:3] != full[3:6]  # each pass has its own order ...
    assert sorted(sum(full[:3], [])) == sorted(sum(full[3:6], []))  # ... of the same examples
    for step in range(7):  # a run restarted after `step` batches sees exactly the rest
        assert labels(step // 3, step % 3, 9 - step) == full[step:]


class _PoisonBeforeStep(keras.callbacks.Callback):
    """Makes the weights NaN just before optimizer step `step` runs (a diverged update)."""

    def __init__(self, step: int, checkpoint: Path, backup: Path):
        super().__init__()
        self.step, self.checkpoint, self.backup = step, checkpoint, backup
        self.seen: dict[str, str] = {}
        self._batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batches += 1
        if self._batches == self.step:
            self.seen = {"checkpoint": _sha(self.checkpoint), "backup": _sha(self.backup)}
            weight = self.model.trainable_weights[0]
            weight.assign(np.full(weight.shape, np.nan, dtype="float32"))


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    config = TrainConfig(output=str(tmp_path / "run"), epochs=2, **TINY)  # 2 epochs x 4 steps
    out = Path(config.output)
    poison = _PoisonBeforeStep(6, out / "checkpoint.keras", out / "backup" / "latest.weights.h5")
    with pytest.raises(NonFiniteLossError) as error:
        fit(config, strategy=None, callbacks=[poison], verbose=0, backup_freq=2)
    message = str(error.value)
    assert "the loss became nan at epoch 2, batch 2 (optimizer step 6)" in message
    assert f"last good checkpoint is left untouched: {out / 'checkpoint.keras'}" in message
    # Neither the epoch-1 checkpoint nor the step-4 backup was overwritten by the NaN step
    # (the backup is due at step 6); the final model was never written.
    assert poison.seen == {"checkpoint": _sha(out / "checkpoint.keras"), "backup": _sha(out / "backup" / "latest.weights.h5")}
    assert not (out / "model.keras").exists()
    restored = keras.saving.load_model(out / "checkpoint.keras")
    assert all(np.isfinite(ops.convert_to_numpy(w)).all() for w in restored.weights)
    assert len((out / "history.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


def _sqrt_model():
    """`sqrt(|x . w|)`: finite loss, but a NaN gradient (0 * inf) on an all-zero batch."""
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: ops.sqrt(ops.abs(t)))(keras.layers.Dense(1, use_bias=False, name="dense")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.random.default_rng(0).normal(size=(12, 3)).astype("float32")
    x[8:] = 0.0  # the third batch of 4
    return model, x, np.ones((12, 1), "float32")


@pytest.mark.parametrize("check_weights_every", [1, None])
def test_nan_guard_checks_weights_before_a_backup_is_written(tmp_path, check_weights_every):
    model, x, y = _sqrt_model()
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(logs["loss"]))
    guard = NaNGuard(check_weights_every=check_weights_every)
    backup = BackupAndRestore(str(tmp_path / "backup"), save_freq=1, delete_checkpoint=False)
    where = ", batch 3" if check_weights_every else " end"  # the epoch-end check always runs
    with pytest.raises(NonFiniteLossError, match=f"weight dense/kernel became non-finite at epoch 1{where}"):
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[guard, record, backup])
    assert len(losses) == (2 if check_weights_every else 3) and all(np.isfinite(losses))
    saved = _sqrt_model()[0]
    saved.optimizer.build(saved.trainable_variables)
    saved.load_weights(tmp_path / "backup" / "latest.weights.h5")
    kernel = ops.convert_to_numpy(saved.weights[0])
    # With the weight check the backup holds step 2's finite weights; without it, the
    # step-3 backup captured the NaN update that the finite loss hid.
    assert np.isfinite(kernel).all() == bool(check_weights_every)
