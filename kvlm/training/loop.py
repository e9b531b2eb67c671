"""Training and evaluation of the VQA classifier on a dataset, written to a run folder.

The retrieval and captioning tasks (`TrainConfig(task=...)`) live in `kvlm.training.tasks`,
the distillation task in `kvlm.training.distillation`, the rag task in `kvlm.training.rag`;
`fit`, `load_run` and `evaluate` dispatch to them. A distillation run folder holds a
`VLMClassifier` (the student) like a vqa one, a rag run a `RetrievalAugmentedVLM` over `answers.txt`.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kvlm.data import (
    answer_vocabulary,
    build_vocabulary,
    encode_answers,
    load_folder,
    load_vocabulary,
    make_dataset,
    make_tokenizer,
    save_vocabulary,
    shapes,
)
from kvlm.experts import load_model
from kvlm.models import VLMClassifier, get_preset
from kvlm.models.distiller import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from kvlm.training.callbacks import (
    BackupAndRestore,
    NaNGuard,
    StopAtStep,
    TrainingCurves,
    read_history_csv,
    restored_step,
)
from kvlm.training.distribution import EXPERT_KERNELS, Distribution, make_distribution
from kvlm.training.reports import classification_report
from kvlm.training.routing import moe_blocks, routing_report, save_routing_heatmap

MODEL_FILE = "model.keras"
ANSWERS_FILE = "answers.txt"
RUN_FILE = "run.json"
# Tasks whose run folder holds a classifier over `answers.txt` (evaluated and exported as vqa): a
# `VLMClassifier`, or the `RetrievalAugmentedVLM` of a rag run (answering with in-graph retrieval).
CLASSIFIER_TASKS = ("vqa", "distillation", "rag")


@dataclass
class TrainConfig:
    """Everything a training run needs; stored as `run.json` beside the model."""

    output: str = "runs/vqa"
    preset: str = "kvlm_tiny"
    encoder: str = "cnn"
    data_dir: str | None = None
    train_size: int = 24000
    eval_size: int = 2000
    eval_fraction: float = 0.2
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    vocabulary_size: int = 400
    augment: bool = False
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    # Plugin datasets (`kvlm.experts.datasets()` names) to mix in equal shares instead of shapes.
    datasets: list[str] | None = None
    # `vqa` (VLMClassifier), `retrieval` (DualEncoder), `captioning` (Captioner), `distillation`
    # (a dense VLMClassifier student of `teacher`) or `rag` (RetrievalAugmentedVLM on product
    # catalogues); see kvlm.training.tasks, kvlm.training.distillation and kvlm.training.rag.
    task: str = "vqa"
    # retrieval: the DualEncoder's contrastive loss, `clip` or `siglip`.
    loss: str = "clip"
    # distillation: the teacher's vqa run folder, and the Distiller's task-loss weight and temperature.
    teacher: str | None = None
    alpha: float = DEFAULT_ALPHA
    temperature: float = DEFAULT_TEMPERATURE
    # rag: entries read per answer, training stores (seeds 0..N-1), the retriever's epochs, the
    # store whose catalogue is in the saved model's index (None: an attached index that is not a
    # product catalogue) and the index folder attached by `kvlm index attach` (None: built in training).
    top_k: int = 3
    train_catalogues: int = 500
    retriever_epochs: int = 3
    index_store: int | None = 10_000
    index_dir: str | None = None


def mix_datasets(
    names: list[str], train_size: int, eval_size: int, seed: int, image_size: int
) -> tuple[list, list]:
    """`(train, eval)` examples mixing the named plugin datasets in equal shares.

    Each dataset gives `train_size // len(names)` examples of its `"train"` split
    and `eval_size // len(names)` of its `"test"` split (seeded with `seed`); each
    mix is shuffled with `seed`.

    Raises:
        ValueError: A name is not a discovered dataset (the message lists the
            available ones), is repeated, or a share would be empty.
    """
    from kvlm.experts import datasets as discovered

    names = list(names)
    available = discovered()
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"Unknown dataset(s) {', '.join(map(repr, unknown))}. Available datasets from the installed kvlm "
            f"plugins: {', '.join(sorted(available)) or 'none'}."
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"`datasets` must name distinct datasets. Received: datasets={names!r}")
    per_train, per_eval = train_size // len(names), eval_size // len(names)
    if per_train < 1 or per_eval < 1:
        raise ValueError(
            f"`train_size` ({train_size}) and `eval_size` ({eval_size}) must each be at least the number of "
            f"datasets ({len(names)})."
        )
    rng = np.random.default_rng(seed)
    splits = []
    for split, per in (("train", per_train), ("test", per_eval)):
        examples = []
        for name in names:
            load = available[name].spec.load
            parameters = inspect.signature(load).parameters
            takes_size = "image_size" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            options = {"image_size": image_size} if takes_size else {}
            examples += list(load(split, per, seed, **options))
        splits.append([examples[i] for i in rng.permutation(len(examples))])
    return splits[0], splits[1]


def load_examples(config: TrainConfig):
    """Returns `(train, eval)` examples: the procedural set, plugin datasets mixed, or a user folder.

    Generated examples are drawn at the model's image size (`overrides["image_size"]` over the preset's).
    """
    image_size = config.overrides.get("image_size", get_preset(config.preset)["image_size"])
    if config.datasets:
        if config.data_dir is not None:
            raise ValueError("Pass `data_dir` or `datasets`, not both.")
        return mix_datasets(config.datasets, config.train_size, config.eval_size, config.seed, image_size)
    if config.data_dir is None:
        return (
            shapes.generate(config.train_size, seed=config.seed, image_size=image_size),
            shapes.generate(config.eval_size, seed=config.seed + 10_000, image_size=image_size),
        )
    examples = load_folder(config.data_dir)
    order = np.random.default_rng(config.seed).permutation(len(examples))
    cut = max(1, int(round(len(examples) * config.eval_fraction)))
    return [examples[i] for i in order[cut:]], [examples[i] for i in order[:cut]]


def make_optimizer(config: TrainConfig, steps: int) -> keras.optimizers.Optimizer:
    """AdamW with linear warm-up (the first 5% of `steps`) and cosine decay to 0 at `steps`."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps, 1), warmup_target=config.learning_rate, warmup_steps=max(steps // 20, 1)
    )
    return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)


def compile_classifier(model: keras.Model, config: TrainConfig, steps: int) -> None:
    """AdamW with linear warm-up and cosine decay, sparse categorical cross-entropy."""
    model.compile(
        optimizer=make_optimizer(config, steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


CHECKPOINT_FILE = "checkpoint.keras"
CURVES_FILE = "training_curves.png"
HISTORY_FILE = "history.csv"
ROUTING_FILE = "routing.json"
ROUTING_PLOT = "routing.png"
BACKUP_DIR = "backup"
LOGS_DIR = "logs"


def _even_batch(count: int, shards: int, limit: int = 256) -> int:
    """The multiple of `shards` (<= `limit`) whose full batches cover the most of `count` examples."""
    sizes = range(shards, max(limit, shards) + 1, shards)
    return max(sizes, key=lambda b: (count - count % b, b))


def training_stream(
    examples, tokenizer, answers, image_size: int, batch_size: int, seed: int,
    augment: bool = False, drop_remainder: bool = False, first_pass: int = 0,
) -> tf.data.Dataset:
    """Endless training batches from pass `first_pass` on; pass `p` is shuffled with seed `(seed, p)` only.

    Each pass is built inside `flat_map`, so its shuffle order never depends on how
    many iterators were made before (Keras opens one for its symbolic build under a
    strategy): a run resumed at step `n` continues with
    `training_stream(..., first_pass=n // steps_per_pass).skip(n % steps_per_pass)`.
    """

    @tf.autograph.experimental.do_not_convert
    def one_pass(index):
        # Traced as a graph: this sets the pass graph's seed, not the global one. A fixed
        # non-zero graph seed lets the shuffle take a tensor op seed (TF cannot with 0).
        tf.random.set_seed(seed + 1)
        data = make_dataset(
            examples, tokenizer, answers, image_size, batch_size,
            shuffle=True, augment=augment, seed=tf.constant(seed, tf.int64) * 1_000_003 + index,
        )
        return data.rebatch(batch_size, drop_remainder=True) if drop_remainder else data

    return tf.data.Dataset.counter(first_pass).flat_map(one_pass)


def _prepare(config: TrainConfig):
    """Examples, preset, vocabulary, answers and tokenizer of a run (after seeding)."""
    keras.utils.set_random_seed(config.seed)
    train_examples, eval_examples = load_examples(config)
    preset = get_preset(config.preset)
    preset.update(config.overrides)
    vocabulary = build_vocabulary(
        [e.question for e in train_examples] + [e.caption for e in train_examples], config.vocabulary_size
    )
    answers = answer_vocabulary(train_examples)
    tokenizer = make_tokenizer(vocabulary, preset["sequence_length"])
    return train_examples, eval_examples, preset, vocabulary, answers, tokenizer


def _build(config: TrainConfig, num_classes: int, vocabulary_size: int, steps: int) -> keras.Model:
    model = VLMClassifier.from_preset(
        config.preset, num_classes=num_classes, vocabulary_size=vocabulary_size,
        encoder=config.encoder, **config.overrides,
    )
    compile_classifier(model, config, steps)
    return model


def _write_run_files(out: Path, config: TrainConfig, vocabulary, answers) -> None:
    """`vocabulary.txt`, `run.json` and (when `answers` is not None) `answers.txt`."""
    save_vocabulary(vocabulary, out)
    if answers is not None:
        (out / ANSWERS_FILE).write_text("\n".join(answers) + "\n", encoding="utf-8")
    (out / RUN_FILE).write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")


def _summary(history, metrics, seconds, train_examples, eval_examples, answers, out) -> dict[str, Any]:
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_seconds": seconds,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "num_classes": len(answers),
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "output": str(out),
    }


def run_callback_list(
    out: Path,
    callbacks: list | None,
    *,
    done: int,
    steps_per_epoch: int,
    total_steps: int,
    checkpoint: bool,
    backup_freq: int | str | None,
    tensorboard: bool,
    model_checkpoint: keras.callbacks.Callback | None = None,
) -> list:
    """The callbacks of a run: NaN guard, `callbacks`, checkpoint / CSV history / curves,
    TensorBoard, backups into `<out>/backup` and the stop at `total_steps`.

    `model_checkpoint` replaces the default `ModelCheckpoint(<out>/checkpoint.keras)`;
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
            model_checkpoint or keras.callbacks.ModelCheckpoint(out / CHECKPOINT_FILE),
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


def fit_resumed(
    model: keras.Model,
    stream: tf.data.Dataset,
    *,
    done: int,
    steps_per_epoch: int,
    epochs: int,
    eval_data,
    callbacks: list,
    verbose: int | str,
):
    """`model.fit` on an endless `stream` of batches (one pass per epoch, starting at the pass
    of step `done`), resumed at step `done`; returns `(history, seconds)`."""
    start = time.perf_counter()
    history = model.fit(
        stream.skip(done % steps_per_epoch), steps_per_epoch=steps_per_epoch, epochs=epochs,
        initial_epoch=done // steps_per_epoch, validation_data=eval_data, callbacks=callbacks, verbose=verbose,
        shuffle=False,  # the stream is shuffled per pass already
    )
    return history, time.perf_counter() - start


def _output_dir(config: TrainConfig, distribution: Distribution) -> Path:
    out = Path(config.output)
    return out if distribution.is_chief else out / "workers" / str(distribution.worker_index)


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
    """Trains a `VLMClassifier` under a distribution strategy and writes the run folder.

    Args:
        config: The run.
        strategy: A name from `kvlm.training.distribution.STRATEGIES` (`auto` picks
            from the environment), a `Distribution`, or None for no strategy.
        callbacks: Extra Keras callbacks (after the NaN guard, before the run's own).
        verbose: Keras `fit` verbosity.
        checkpoint: Write `checkpoint.keras` (ModelCheckpoint, every epoch),
            `history.csv` (CSVLogger) and `training_curves.png` beside it.
        backup_freq: `BackupAndRestore` into `<output>/backup` every this many steps
            (or `"epoch"`); a restarted run resumes from the last backup at the
            exact step and data position. None: no backups.
        tensorboard: Write TensorBoard logs to `<output>/logs`.

    When the model has SparseMoE layers, the held-out examples' routing per domain
    is written to `routing.json` and `routing.png` (see `kvlm.training.routing`)
    and returned under `"routing"`.

    The global batch is `config.batch_size`, split over the strategy's replicas.
    A `NaNGuard` stops training with `NonFiniteLossError` at the first non-finite
    loss, before any checkpoint or backup is overwritten. In a multi-worker run the
    chief writes `config.output`, other workers `<output>/workers/<index>`.

    Returns a summary with the held-out metrics, history, steps and paths.

    `config.task` `retrieval`, `captioning`, `distillation` or `rag` trains a `DualEncoder`, a
    `Captioner`, a dense student of `config.teacher` or a `RetrievalAugmentedVLM` instead
    (`kvlm.training.tasks.fit_task`, same arguments; one device only).
    """
    if config.task != "vqa":
        from kvlm.training.tasks import fit_task

        return fit_task(
            config, strategy, callbacks, verbose,
            checkpoint=checkpoint, backup_freq=backup_freq, tensorboard=tensorboard,
        )
    # The strategy comes first: MultiWorkerMirroredStrategy must precede any TF op.
    distribution = strategy if isinstance(strategy, Distribution) else make_distribution(strategy)
    out = _output_dir(config, distribution)
    out.mkdir(parents=True, exist_ok=True)
    train_examples, eval_examples, preset, vocabulary, answers, tokenizer = _prepare(config)

    shards = distribution.batch_shards
    if config.batch_size % shards:
        raise ValueError(
            f"`batch_size` must be a multiple of the {shards} replicas of strategy {distribution.name!r}. "
            f"Received: batch_size={config.batch_size}"
        )
    eval_batch = 256
    if distribution.even_batches:
        steps_per_epoch = len(train_examples) // config.batch_size
        eval_batch = _even_batch(len(eval_examples), shards)
        eval_examples = eval_examples[: len(eval_examples) - len(eval_examples) % eval_batch]
    else:
        steps_per_epoch = -(-len(train_examples) // config.batch_size)
    if steps_per_epoch < 1 or not eval_examples:
        raise ValueError(
            f"Too few examples ({len(train_examples)} train, {len(eval_examples)} held-out) for a global batch "
            f"of {config.batch_size} over {shards} replicas."
        )
    eval_data = make_dataset(eval_examples, tokenizer, answers, preset["image_size"], eval_batch)
    if distribution.even_batches:
        eval_data = eval_data.rebatch(eval_batch, drop_remainder=True)
    total_steps = config.epochs * steps_per_epoch

    with distribution.scope():
        model = _build(config, len(answers), len(vocabulary), total_steps)
        model.optimizer.build(model.trainable_variables)
    if distribution.name == "expert_parallel" and not any(re.fullmatch(EXPERT_KERNELS, v.path) for v in model.weights):
        raise ValueError(
            "Strategy 'expert_parallel' shards SparseMoE experts, but this model has none: add "
            'overrides={"moe": {"experts": 8, "top_k": 2}} to the TrainConfig (`kvlm train --moe-experts 8`).'
        )
    backup_dir = out / BACKUP_DIR
    done = restored_step(model, backup_dir) if backup_freq is not None else 0
    _write_run_files(out, config, vocabulary, answers)

    run_callbacks = run_callback_list(
        out, callbacks, done=done, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        checkpoint=checkpoint, backup_freq=backup_freq, tensorboard=tensorboard,
    )

    # One endless stream of batches (a pass per epoch), positioned where the backup stopped.
    # JAX shards every batch: keep full, evenly split batches only.
    stream = training_stream(
        train_examples, tokenizer, answers, preset["image_size"], config.batch_size, config.seed,
        augment=config.augment, drop_remainder=distribution.even_batches, first_pass=done // steps_per_epoch,
    )
    history, seconds = fit_resumed(
        model, stream, done=done, steps_per_epoch=steps_per_epoch, epochs=config.epochs, eval_data=eval_data,
        callbacks=run_callbacks, verbose=verbose,
    )
    model.save(out / MODEL_FILE)
    metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
    summary = _summary(history, metrics, seconds, train_examples, eval_examples, answers, out) | {
        "strategy": distribution.name,
        "replicas": shards,
        "workers": distribution.num_workers,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_from_step": done,
    }
    # Routing of the held-out examples per domain, for models with SparseMoE layers (not for
    # multi-process JAX runs, whose variables span processes).
    if moe_blocks(model) and not (distribution.backend == "jax" and distribution.num_workers > 1):
        report = routing_report(model, eval_examples, tokenizer)
        report.save_json(out / ROUTING_FILE)
        save_routing_heatmap(report, out / ROUTING_PLOT)
        summary["routing"] = report.to_dict()
    return summary


def train(config: TrainConfig, callbacks: list | None = None, verbose: int | str = "auto") -> dict[str, Any]:
    """Trains a `VLMClassifier` on one device, evaluates it on the held-out split and saves the run.

    The original single-device loop: the training set is shuffled by `make_dataset`
    each epoch, nothing is distributed, checkpointed or resumable. `fit` is the
    full version (strategies, checkpoints, backups, NaN guard); it orders the data
    differently, so the two give different (equally valid) weights for one config.

    Returns a summary with the held-out metrics, training time and paths.
    VQA only: train the other tasks with `fit`.
    """
    if config.task != "vqa":
        raise ValueError(
            f"`train` trains the vqa task only; use `fit` for the {config.task!r} task. Received: task={config.task!r}"
        )
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    train_examples, eval_examples, preset, vocabulary, answers, tokenizer = _prepare(config)
    train_data = make_dataset(
        train_examples, tokenizer, answers, preset["image_size"], config.batch_size,
        shuffle=True, augment=config.augment, seed=config.seed,
    )
    eval_data = make_dataset(eval_examples, tokenizer, answers, preset["image_size"], 256)
    model = _build(config, len(answers), len(vocabulary), config.epochs * -(-len(train_examples) // config.batch_size))
    _write_run_files(out, config, vocabulary, answers)
    start = time.perf_counter()
    history = model.fit(
        train_data, validation_data=eval_data, epochs=config.epochs, callbacks=callbacks or [], verbose=verbose,
        shuffle=False,  # make_dataset shuffles every epoch
    )
    seconds = time.perf_counter() - start
    model.save(out / MODEL_FILE)
    metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
    return _summary(history, metrics, seconds, train_examples, eval_examples, answers, out)


def load_run(run_dir: str | Path):
    """Loads `(model, tokenizer, answers, config)` from a run folder of any task.

    `model` is the task's model (`VLMClassifier` for vqa and distillation runs, `DualEncoder`,
    `Captioner` or `RetrievalAugmentedVLM` for rag runs); `answers` is the label set of a
    classifier run (vqa, distillation, rag) and `[]` for the other tasks.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"No {MODEL_FILE} in {run_dir}: train a model there first (`kvlm train`).")
    config = TrainConfig(**json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")))
    model = load_model(run_dir / MODEL_FILE)  # registers plugin experts first
    vocabulary = load_vocabulary(run_dir)
    answers = (run_dir / ANSWERS_FILE).read_text(encoding="utf-8").split() if config.task in CLASSIFIER_TASKS else []
    # The classifier keeps its sizes on its backbone; DualEncoder and Captioner on the model.
    sequence_length = model.backbone.sequence_length if hasattr(model, "backbone") else model.sequence_length
    tokenizer = make_tokenizer(vocabulary, sequence_length)
    return model, tokenizer, answers, config


def evaluate(run_dir: str | Path, data_dir: str | None = None, size: int | None = None) -> dict[str, Any]:
    """Evaluates a saved run on its held-out split (or on `data_dir`).

    Returns `loss`, `accuracy`, `macro_precision`, `macro_recall`, `macro_f1`,
    `examples` and `per_domain` ({domain: the same metrics and its examples}).
    Retrieval and captioning runs return `kvlm.training.tasks.evaluate_task`'s
    report instead (recall@k, or BLEU-4 and example captions), marked by `task`; distillation
    runs (a `VLMClassifier` student) are evaluated as vqa runs. Rag runs are too, answering
    with in-graph retrieval from their index, on fresh examples of the store whose catalogue is
    in it (`kvlm.training.rag.index_store_examples`; `size` of them, default `eval_size`) or
    on `data_dir`; their report adds `index_store`.
    """
    model, tokenizer, answers, config = load_run(run_dir)
    if data_dir is not None:
        examples = load_folder(data_dir)
    elif config.task == "rag":
        from kvlm.training.rag import index_store_examples

        examples = index_store_examples(config, size, model.backbone.image_size)
    else:
        if size is not None:
            config.eval_size = size
        _, examples = load_examples(config)
    if config.task not in CLASSIFIER_TASKS:
        from kvlm.training.tasks import evaluate_task

        return evaluate_task(model, tokenizer, config, examples)
    data = make_dataset(examples, tokenizer, answers, model.backbone.image_size, 256)
    logits = np.asarray(model.predict(data, verbose=0), dtype=np.float64)
    labels = encode_answers(examples, answers)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    report = classification_report(labels, logits.argmax(axis=-1), [e.domain for e in examples])
    if config.task == "rag":
        report["index_store"] = None if data_dir is not None else config.index_store
    return {"loss": loss} | report
