"""The distillation task: a trained VQA run (the teacher) distilled into a small dense `VLMClassifier`.

`kvlm.training.fit` trains it when `TrainConfig.task` is `distillation` and
`TrainConfig.teacher` names a vqa (or distillation) run folder. The student is
`VLMClassifier.from_preset(config.preset, encoder=config.encoder, **config.overrides)`
without SparseMoE layers (`kvlm train` sets `num_fusion_layers` from
`--student-fusion-layers`), trained with `kvlm.models.Distiller`
(`alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T || student_T)`) on the
teacher run's data: its data folder or datasets, sizes, split seed, vocabulary,
answers, image size and sequence length.

The run folder is a vqa run folder holding the student (`model.keras`,
`checkpoint.keras`, `vocabulary.txt`, `answers.txt`, `run.json` with `task` and
`teacher`, `history.csv`, `training_curves.png`), so `load_run`, `evaluate` and
`kvlm export` treat it as a classifier, plus `distillation.json`: held-out accuracy
of student and teacher, parameters and forward FLOPs of both (`model_profile`)
and the student / teacher ratios.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kvlm.data import encode_answers, load_vocabulary, make_dataset
from kvlm.models import VLMClassifier, get_preset
from kvlm.models.distiller import Distiller
from kvlm.models.flops import model_profile
from kvlm.training.callbacks import restored_step
from kvlm.training.distribution import Distribution
from kvlm.training.run import (
    ANSWERS_FILE,
    BACKUP_DIR,
    CHECKPOINT_FILE,
    MODEL_FILE,
    RUN_FILE,
    TrainConfig,
    _output_dir,
    _summary,
    _write_run_files,
    load_examples,
    load_run,
    fit_resumed,
    make_optimizer,
    run_callback_list,
    training_stream,
)

DISTILLATION_FILE = "distillation.json"
# Run tasks whose model.keras is a VLMClassifier over answers.txt: the teachers a student can learn from.
TEACHER_TASKS = ("vqa", "distillation")
# TrainConfig fields that describe the data; a student takes them from its teacher's run.json.
DATA_FIELDS = ("data_dir", "datasets", "train_size", "eval_size", "eval_fraction", "seed", "vocabulary_size")


def teacher_config(teacher: str | Path | None) -> TrainConfig:
    """The `TrainConfig` of the teacher run folder `teacher`.

    Raises:
        ValueError: `teacher` is missing, is not a finished run folder, or is a run
            of a task other than vqa / distillation (not a `VLMClassifier`).
    """
    if not teacher:
        raise ValueError(
            "The distillation task needs a trained vqa run as its teacher: pass --teacher RUN_DIR "
            "(`TrainConfig.teacher`), e.g. a folder written by `kvlm train --task vqa`."
        )
    path = Path(teacher)
    missing = [name for name in (RUN_FILE, MODEL_FILE) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"Teacher {teacher} is not a trained run folder (no {' or '.join(missing)}): "
            "train one with `kvlm train --task vqa` first."
        )
    config = TrainConfig(**json.loads((path / RUN_FILE).read_text(encoding="utf-8")))
    if config.task not in TEACHER_TASKS:
        raise ValueError(
            f"Teacher {teacher} is a {config.task} run; the distillation task distils a vqa classifier run "
            f"(task {' or '.join(TEACHER_TASKS)}). Pass a `kvlm train --task vqa` run folder as --teacher."
        )
    if not (path / ANSWERS_FILE).is_file():
        raise ValueError(f"Teacher {teacher} has no {ANSWERS_FILE}: it is not a complete vqa run folder.")
    return config


def check_distillation(config: TrainConfig) -> TrainConfig:
    """Validates a distillation config; returns its teacher's `TrainConfig`.

    Raises:
        ValueError: For a missing or wrong teacher, a student with SparseMoE layers,
            `alpha` outside [0, 1] or a non-positive `temperature`.
    """
    teacher = teacher_config(config.teacher)
    if "moe" in config.overrides:
        raise ValueError(
            "The distillation student is a dense VLMClassifier: drop `--moe-experts` (the teacher may have experts)."
        )
    if not 0.0 <= config.alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={config.alpha}")
    if not config.temperature > 0.0:
        raise ValueError(f"`temperature` must be > 0. Received: temperature={config.temperature}")
    return teacher


def distillation_config(config: TrainConfig) -> TrainConfig:
    """`config` on its teacher's data: `DATA_FIELDS` from the teacher's `run.json`, the teacher's
    image size and sequence length in `overrides` (where the student preset's differ), and
    `teacher` as an absolute path."""
    teacher = check_distillation(config)
    teacher_preset = get_preset(teacher.preset) | teacher.overrides
    student_preset = get_preset(config.preset) | config.overrides
    overrides = dict(config.overrides)
    for key in ("image_size", "sequence_length"):
        if student_preset[key] != teacher_preset[key]:
            overrides[key] = teacher_preset[key]
    data = {name: getattr(teacher, name) for name in DATA_FIELDS}
    return replace(config, **data, overrides=overrides, teacher=str(Path(config.teacher).resolve()))


class _StudentCheckpoint(keras.callbacks.Callback):
    """Saves the distiller's student (not the teacher) to `path` after every epoch."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        self.model.student.save(self.path)


def _accuracy(model: keras.Model, data, labels: np.ndarray) -> float:
    logits = np.asarray(model.predict(data, verbose=0))
    return float((logits.argmax(axis=-1) == labels).mean())


def distillation_report(
    student: keras.Model, teacher: keras.Model, student_accuracy: float, teacher_accuracy: float,
) -> dict[str, Any]:
    """Accuracy, parameters and FLOPs of student and teacher, and the student / teacher ratios.

    `ratios`: `accuracy`, `parameters` (total), `active_parameters` (the MoE teacher's
    active parameters: router and top-k experts per token) and `flops` (per-example
    forward FLOPs, the teacher's with top-k experts).
    """
    s, t = model_profile(student), model_profile(teacher)
    return {
        "student": {"accuracy": student_accuracy, **s},
        "teacher": {"accuracy": teacher_accuracy, **t},
        "ratios": {
            "accuracy": student_accuracy / teacher_accuracy if teacher_accuracy else float("nan"),
            "parameters": s["parameters"]["total"] / t["parameters"]["total"],
            "active_parameters": s["parameters"]["active"] / t["parameters"]["active"],
            "flops": s["flops"] / t["flops"],
        },
    }


def fit_distillation(
    config: TrainConfig,
    strategy: str | Distribution | None = "auto",
    callbacks: list | None = None,
    verbose: int | str = "auto",
    *,
    checkpoint: bool = True,
    backup_freq: int | str | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Distils `config.teacher` into a dense student and writes the student's run folder.

    Arguments as for `kvlm.training.fit`; `strategy` must be `auto` or `one_device`
    (see `kvlm.training.tasks.task_distribution`). Backups hold the distiller's
    weights (student, teacher and optimizer); `checkpoint.keras` the student.

    Returns the summary of `fit` with `task` and `distillation` (the content of
    `distillation.json`: see `distillation_report`, plus `teacher_run`, `alpha`,
    `temperature`); the held-out `metrics` are the distillation loss and the
    student's accuracy.
    """
    from kvlm.training.tasks import task_distribution

    config = distillation_config(config)
    distribution = task_distribution(config.task, strategy)
    out = _output_dir(config, distribution)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    train_examples, eval_examples = load_examples(config)
    if not train_examples or not eval_examples:
        raise ValueError(
            f"The distillation task needs training and held-out examples. "
            f"Received: {len(train_examples)} train, {len(eval_examples)} held-out."
        )
    teacher, tokenizer, answers, _ = load_run(config.teacher)
    vocabulary = load_vocabulary(config.teacher)
    image_size = teacher.backbone.image_size
    steps_per_epoch = -(-len(train_examples) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    eval_data = make_dataset(eval_examples, tokenizer, answers, image_size, 256)

    with distribution.scope():
        student = VLMClassifier.from_preset(
            config.preset, num_classes=len(answers), vocabulary_size=len(vocabulary),
            encoder=config.encoder, **config.overrides,
        )
        model = Distiller(teacher, student, name="distiller")
        model.compile(
            optimizer=make_optimizer(config, total_steps),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            alpha=config.alpha, temperature=config.temperature,
        )
        model.optimizer.build(model.trainable_variables)
    backup_dir = out / BACKUP_DIR
    done = restored_step(model, backup_dir) if backup_freq is not None else 0
    _write_run_files(out, config, vocabulary, answers)

    run_callbacks = run_callback_list(
        out, callbacks, done=done, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        checkpoint=checkpoint, backup_freq=backup_freq, tensorboard=tensorboard,
        model_checkpoint=_StudentCheckpoint(out / CHECKPOINT_FILE) if checkpoint else None,
    )

    stream = training_stream(
        train_examples, tokenizer, answers, image_size, config.batch_size, config.seed,
        augment=config.augment, first_pass=done // steps_per_epoch,
    )
    history, seconds = fit_resumed(
        model, stream, done=done, steps_per_epoch=steps_per_epoch, epochs=config.epochs, eval_data=eval_data,
        callbacks=run_callbacks, verbose=verbose,
    )
    student.save(out / MODEL_FILE)
    metrics = model.evaluate(eval_data, return_dict=True, verbose=0)

    labels = encode_answers(eval_examples, answers)
    report = {
        "teacher_run": config.teacher,
        "student_preset": config.preset,
        "alpha": config.alpha,
        "temperature": config.temperature,
        "eval_examples": len(eval_examples),
    } | distillation_report(student, teacher, _accuracy(student, eval_data, labels), _accuracy(teacher, eval_data, labels))
    (out / DISTILLATION_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    summary = _summary(history, metrics, seconds, train_examples, eval_examples, answers, out)
    return summary | {
        "task": config.task,
        "strategy": distribution.name,
        "replicas": 1,
        "workers": 1,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_from_step": done,
        "distillation": report,
    }


def format_distillation(report: dict[str, Any]) -> str:
    """The figures of a `distillation.json` report as text."""
    s, t, r = report["student"], report["teacher"], report["ratios"]

    def row(name: str, model: dict[str, Any]) -> str:
        p = model["parameters"]
        return f"{name:<10}{model['accuracy']:>10.4f}{p['total']:>14,}{p['active']:>14,}{model['flops'] / 1e6:>12.2f}"

    header = f"{'model':<10}{'accuracy':>10}{'parameters':>14}{'active':>14}{'MFLOPs':>12}"
    return "\n".join([
        f"distillation of {report['teacher_run']} (alpha {report['alpha']}, temperature {report['temperature']}; "
        f"held-out accuracy on {report['eval_examples']} examples, forward FLOPs per example)",
        "",
        header,
        "-" * len(header),
        row("teacher", t),
        row("student", s),
        "",
        f"student / teacher: accuracy {r['accuracy']:.3f}, parameters {r['parameters']:.3f} "
        f"(active {r['active_parameters']:.3f}), FLOPs {r['flops']:.3f}",
    ])
