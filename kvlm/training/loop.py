"""The training loop every task shares: `fit(config)` trains `config.task` and writes the run folder.

What differs between tasks comes from their `kvlm.tasks.base.Task` hooks; distribution,
resuming from backups, the NaN guard, the callback list and the summary are here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from kvlm.runs import (
    BACKUP_DIR,
    CHECKPOINT_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    LOGS_DIR,
    MODEL_FILE,
    TrainConfig,
    write_run_files,
)
from kvlm.tasks import get_task, task_info, task_names
from kvlm.tasks.info import ONE_DEVICE, TaskInfo
from kvlm.training.callbacks import (
    BackupAndRestore,
    NaNGuard,
    StopAtStep,
    TrainingCurves,
    read_history_csv,
    restored_step,
)
from kvlm.training.distribution import EXPERT_KERNELS, Distribution, make_distribution
from kvlm.training.tracing import build_before_tracing


def resolve_config(config: TrainConfig) -> TrainConfig:
    """`config` with the task's defaults for unset sizes and its options filled in.

    Raises:
        ValueError: For an unknown task, an unknown task option, or a field the task refuses.
    """
    info = task_info(config.task)
    info.check_refused(vars(config))
    unset = {name: info.defaults[name] for name in info.defaults if getattr(config, name, None) is None}
    return replace(config, **unset, task_options=info.resolve_options(config.task_options))


def resolve_distribution(info: TaskInfo, strategy: str | Distribution | None = "auto", **options) -> Distribution:
    """The `Distribution` a task trains under.

    A task with every strategy gets `make_distribution(strategy, **options)`; a one-device
    task (`ONE_DEVICE`) gets no strategy for `auto` / None, a `OneDeviceStrategy` for
    `one_device`, or a `Distribution` with one replica on one worker.

    Raises:
        ValueError: The task does not train under `strategy`.
    """
    name = strategy.name if isinstance(strategy, Distribution) else strategy or "auto"
    if isinstance(strategy, Distribution) and strategy.batch_shards == 1 and strategy.num_workers == 1:
        return strategy
    if name not in info.strategies:
        raise ValueError(strategy_error(info, name))
    if isinstance(strategy, Distribution):
        return strategy
    if info.strategies == ONE_DEVICE:
        return make_distribution(None if name == "auto" else name)
    return make_distribution(strategy, **options)


def strategy_error(info: TaskInfo, strategy: str) -> str:
    """Why `info`'s task cannot train under `strategy`, naming the tasks that can."""
    others = [name for name in task_names() if strategy in task_info(name).strategies]
    where = f"supported for the {' and '.join(others)} task{'s' if len(others) > 1 else ''} only" if others else "unknown"
    return (
        f"Strategy {strategy!r} is {where}; the {info.name} task trains on one device. "
        f"Use --strategy {' or '.join(info.strategies)}" + (f" (or --task {others[0]})." if others else ".")
    )


def training_stream(make_pass: Callable[[tf.Tensor], tf.data.Dataset], seed: int, first_pass: int = 0) -> tf.data.Dataset:
    """Endless batches from pass `first_pass` on; pass `p` is `make_pass(seed * 1_000_003 + p)`.

    Each pass is built inside `flat_map`, so its shuffle order never depends on how many
    iterators were made before (Keras opens one for its symbolic build under a strategy): a
    run resumed at step `n` continues with
    `training_stream(..., first_pass=n // steps_per_pass).skip(n % steps_per_pass)`.
    """

    @tf.autograph.experimental.do_not_convert
    def one_pass(index):
        # Traced as a graph: this sets the pass graph's seed, not the global one. A fixed
        # non-zero graph seed lets the shuffle take a tensor op seed (TF cannot with 0).
        tf.random.set_seed(seed + 1)
        return make_pass(tf.constant(seed, tf.int64) * 1_000_003 + index)

    return tf.data.Dataset.counter(first_pass).flat_map(one_pass)


def run_callback_list(
    out: Path,
    callbacks: list | None,
    *,
    done: int,
    steps_per_epoch: int,
    total_steps: int,
    checkpoint: keras.callbacks.Callback | None,
    backup_freq: int | str | None,
    tensorboard: bool,
) -> list:
    """The callbacks of a run: NaN guard, `callbacks`, `checkpoint` with the CSV history and
    curves, TensorBoard, backups into `<out>/backup` and the stop at `total_steps`.

    `done` is the step a restored backup resumes from (0: a fresh history).
    """
    guard = NaNGuard(
        out / CHECKPOINT_FILE if checkpoint else None,
        check_weights_every=backup_freq if isinstance(backup_freq, int) else None,
    )
    run_callbacks = [guard, *(callbacks or [])]
    if checkpoint:
        if not done:
            (out / HISTORY_FILE).unlink(missing_ok=True)
        run_callbacks += [
            checkpoint,
            keras.callbacks.CSVLogger(str(out / HISTORY_FILE), append=True),
            TrainingCurves(out / CURVES_FILE, read_history_csv(out / HISTORY_FILE)),
        ]
    if tensorboard:
        run_callbacks.append(keras.callbacks.TensorBoard(str(out / LOGS_DIR)))
    if backup_freq is not None:
        run_callbacks.append(
            BackupAndRestore(str(out / BACKUP_DIR), save_freq=backup_freq, steps_per_epoch=steps_per_epoch)
        )
    run_callbacks.append(StopAtStep(total_steps))
    return run_callbacks


def _even_batch(count: int, shards: int, limit: int = 256) -> int:
    """The multiple of `shards` (<= `limit`) whose full batches cover the most of `count` examples."""
    sizes = range(shards, max(limit, shards) + 1, shards)
    return max(sizes, key=lambda b: (count - count % b, b))


def fit(
    config: TrainConfig,
    strategy: str | Distribution | None = "auto",
    callbacks: list | None = None,
    verbose: int | str = "auto",
    *,
    checkpoint: bool = True,
    backup_freq: int | str | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Trains the model of `config.task` under a distribution strategy and writes the run folder.

    Args:
        config: The run (sizes left at None take the task's defaults).
        strategy: A name from `kvlm.training.distribution.STRATEGIES` (`auto` picks
            from the environment), a `Distribution`, or None for no strategy. Tasks other
            than vqa train on one device (`auto` or `one_device`).
        callbacks: Extra Keras callbacks (after the NaN guard, before the run's own).
        verbose: Keras `fit` verbosity.
        checkpoint: Write `checkpoint.keras` (every epoch), `history.csv` (CSVLogger)
            and `training_curves.png` beside it.
        backup_freq: `BackupAndRestore` into `<output>/backup` every this many steps
            (or `"epoch"`); a restarted run resumes from the last backup at the
            exact step and data position. None: no backups.
        tensorboard: Write TensorBoard logs to `<output>/logs`.

    The global batch is `config.batch_size`, split over the strategy's replicas. A
    `NaNGuard` stops training with `NonFiniteLossError` at the first non-finite loss,
    before any checkpoint or backup is overwritten. In a multi-worker run the chief writes
    `config.output`, other workers `<output>/workers/<index>`.

    Returns a summary: `task`, held-out `metrics`, `history`, `train_seconds`, example
    counts, `num_classes` (classifier tasks), `strategy`, `replicas`, `workers`, `steps`,
    `resumed_from_step`, `output`, and the task's reports (`routing`, `recall`,
    `distillation`, `rag`).
    """
    task = get_task(config.task)
    config = task.configure(resolve_config(config))
    # The strategy comes first: MultiWorkerMirroredStrategy must precede any TF op.
    distribution = resolve_distribution(task.info, strategy)
    out = Path(config.output)
    if not distribution.is_chief:
        out = out / "workers" / str(distribution.worker_index)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    data = task.prepare(config)

    shards = distribution.batch_shards
    if config.batch_size % shards:
        raise ValueError(
            f"`batch_size` must be a multiple of the {shards} replicas of strategy {distribution.name!r}. "
            f"Received: batch_size={config.batch_size}"
        )
    held_out = data.held_out
    eval_batch = task.eval_batch or config.batch_size
    if distribution.even_batches:  # JAX shards every batch: keep full, evenly split batches only
        steps_per_epoch = len(data.train) // config.batch_size
        eval_batch = _even_batch(len(held_out), shards)
        held_out = held_out[: len(held_out) - len(held_out) % eval_batch]
    else:
        steps_per_epoch = -(-len(data.train) // config.batch_size)
    if steps_per_epoch < 1 or not held_out:
        raise ValueError(
            f"Too few examples for the {config.task} task ({len(data.train)} train, {len(held_out)} held-out) for "
            f"a global batch of {config.batch_size} over {shards} replicas."
        )
    total_steps = config.epochs * steps_per_epoch

    resuming = backup_freq is not None and (out / BACKUP_DIR).is_dir()
    with distribution.scope():
        task.pretrain(config, data, out, resuming)
        model = task.build_model(config, data, total_steps)
        model.optimizer.build(model.trainable_variables)
    if distribution.name == "expert_parallel" and not any(re.fullmatch(EXPERT_KERNELS, v.path) for v in model.weights):
        raise ValueError(
            "Strategy 'expert_parallel' shards SparseMoE experts, but this model has none: add "
            'overrides={"moe": {"experts": 8, "top_k": 2}} to the TrainConfig (`kvlm train --moe-experts 8`).'
        )
    done = restored_step(model, out / BACKUP_DIR) if backup_freq is not None else 0
    write_run_files(out, config, data.vocabulary, data.answers)

    eval_data = task.eval_dataset(config, data, held_out, eval_batch)
    run_callbacks = run_callback_list(
        out, callbacks, done=done, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        checkpoint=task.checkpoint_callback(out / CHECKPOINT_FILE) if checkpoint else None,
        backup_freq=backup_freq, tensorboard=tensorboard,
    )

    def one_pass(seed):
        batches = task.train_pass(config, data, seed)
        return batches.rebatch(config.batch_size, drop_remainder=True) if distribution.even_batches else batches

    # One endless stream of batches (a pass per epoch), positioned where the backup stopped.
    stream = training_stream(one_pass, config.seed, first_pass=done // steps_per_epoch)
    with distribution.scope():
        build_before_tracing(model, stream.element_spec)
    start = time.perf_counter()
    history = model.fit(
        stream.skip(done % steps_per_epoch), steps_per_epoch=steps_per_epoch, epochs=config.epochs,
        initial_epoch=done // steps_per_epoch, validation_data=eval_data, callbacks=run_callbacks, verbose=verbose,
        shuffle=False,  # the stream is shuffled per pass already
    )
    seconds = time.perf_counter() - start
    task.saved_model(model).save(out / MODEL_FILE)
    metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
    summary = {
        "task": config.task,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_seconds": seconds,
        "train_examples": len(data.train),
        "eval_examples": len(held_out),
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "output": str(out),
        "strategy": distribution.name,
        "replicas": shards,
        "workers": distribution.num_workers,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_from_step": done,
    }
    if data.answers is not None:
        summary["num_classes"] = len(data.answers)
    return summary | task.after_training(config, replace(data, held_out=held_out), model, out, distribution)
