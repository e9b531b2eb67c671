"""The distillation task: a trained vqa run (the teacher) distilled into a small dense `VLMClassifier`.

The student is `VLMClassifier.from_preset(config.preset, encoder=config.encoder,
**config.overrides)` without SparseMoE layers (`kvlm train` sets the preset from
`--student-preset` and `num_fusion_layers` from `--student-fusion-layers`), trained with
`kvlm.models.Distiller` (`alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T ||
student_T)`) on the teacher run's data: its data folder or datasets, sizes, split seed,
vocabulary, answers, image size and sequence length.

The run folder is a classifier run folder holding the student, so `kvlm evaluate` and
`kvlm export` treat it as one, plus `distillation.json`: held-out accuracy of student and
teacher, parameters and forward FLOPs of both (`model_profile`) and the student / teacher ratios.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kvlm.data import encode_answers
from kvlm.models import VLMClassifier
from kvlm.models.distiller import Distiller
from kvlm.models.flops import model_profile
from kvlm.runs import ANSWERS_FILE, MODEL_FILE, RUN_FILE, TrainConfig, load_run, read_config, read_vocabulary
from kvlm.tasks.base import ClassifierTask, TrainData, make_optimizer, trained_line
from kvlm.tasks.distillation import DATA_FIELDS, INFO
from kvlm.tasks.vqa import INFO as VQA
from kvlm.training.distribution import Distribution

DISTILLATION_FILE = "distillation.json"
# Run tasks whose model.keras is a VLMClassifier over answers.txt: the teachers a student can learn from.
TEACHER_TASKS = (VQA.name, INFO.name)


def teacher_config(teacher: str | Path | None) -> TrainConfig:
    """The `TrainConfig` of the teacher run folder `teacher`.

    Raises:
        ValueError: `teacher` is missing, is not a finished run folder, or is a run
            of a task other than vqa / distillation (not a `VLMClassifier`).
    """
    if not teacher:
        raise ValueError(
            "The distillation task needs a trained vqa run as its teacher: pass --teacher RUN_DIR "
            '(`TrainConfig.task_options["teacher"]`), e.g. a folder written by `kvlm train --task vqa`.'
        )
    path = Path(teacher)
    missing = [name for name in (RUN_FILE, MODEL_FILE) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"Teacher {teacher} is not a trained run folder (no {' or '.join(missing)}): "
            "train one with `kvlm train --task vqa` first."
        )
    config = read_config(path)
    if config.task not in TEACHER_TASKS:
        raise ValueError(
            f"Teacher {teacher} is a {config.task} run; the distillation task distils a vqa classifier run "
            f"(task {' or '.join(TEACHER_TASKS)}). Pass a `kvlm train --task vqa` run folder as --teacher."
        )
    if not (path / ANSWERS_FILE).is_file():
        raise ValueError(f"Teacher {teacher} has no {ANSWERS_FILE}: it is not a complete vqa run folder.")
    return config


class StudentCheckpoint(keras.callbacks.Callback):
    """Saves the distiller's student (not the teacher) to `path` after every epoch."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        self.model.student.save(self.path)


def accuracy(model: keras.Model, data, labels: np.ndarray) -> float:
    """The share of `labels` that `model`'s arg-max predictions on `data` get right."""
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


class DistillationTask(ClassifierTask):
    """A `Distiller` of the teacher run and a dense student; `model.keras` holds the student."""

    info = INFO

    def configure(self, config: TrainConfig) -> TrainConfig:
        """`config` on its teacher's data: `DATA_FIELDS` from the teacher's `run.json`, the teacher's
        image size and sequence length in `overrides` (where the student preset's differ), and
        `teacher` as an absolute path.

        Raises:
            ValueError: For a missing or wrong teacher, a student with SparseMoE layers,
                `alpha` outside [0, 1] or a non-positive `temperature`.
        """
        options = config.options
        teacher = teacher_config(options["teacher"])
        if "moe" in config.overrides:
            raise ValueError(
                "The distillation student is a dense VLMClassifier: drop `--moe-experts` (the teacher may have experts)."
            )
        if not 0.0 <= options["alpha"] <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={options['alpha']}")
        if not options["temperature"] > 0.0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={options['temperature']}")
        teacher_preset, student_preset = self.preset(teacher), self.preset(config)
        overrides = dict(config.overrides)
        for key in ("image_size", "sequence_length"):
            if student_preset[key] != teacher_preset[key]:
                overrides[key] = teacher_preset[key]
        data = {name: getattr(teacher, name) for name in DATA_FIELDS}
        options = {**options, "teacher": str(Path(options["teacher"]).resolve())}
        return replace(config, **data, overrides=overrides, task_options=options)

    def prepare(self, config: TrainConfig) -> TrainData:
        """The teacher's examples, vocabulary, tokenizer and answers, and the teacher (`extra["teacher"]`)."""
        train, held_out = self.examples(config)
        teacher = load_run(config.options["teacher"])
        return TrainData(
            train, held_out, read_vocabulary(teacher.path), teacher.tokenizer, teacher.model.backbone.image_size,
            teacher.answers, extra={"teacher": teacher.model},
        )

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        student = VLMClassifier.from_preset(
            config.preset, num_classes=len(data.answers), vocabulary_size=len(data.vocabulary),
            encoder=config.encoder, **config.overrides,
        )
        model = Distiller(data.extra["teacher"], student, name="distiller")
        model.compile(
            optimizer=make_optimizer(config, steps),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            alpha=config.options["alpha"], temperature=config.options["temperature"],
        )
        return model

    def checkpoint_callback(self, path: Path) -> keras.callbacks.Callback:
        return StudentCheckpoint(path)

    def saved_model(self, model: keras.Model) -> keras.Model:
        return model.student

    def after_training(
        self, config: TrainConfig, data: TrainData, model: keras.Model, out: Path, distribution: Distribution
    ) -> dict[str, Any]:
        """`distillation.json`: `distillation_report` plus `teacher_run`, `student_preset`, `alpha`,
        `temperature` and `eval_examples`."""
        options = config.options
        eval_data = self.eval_dataset(config, data, data.held_out, self.eval_batch)
        labels = encode_answers(data.held_out, data.answers)
        report = {
            "teacher_run": options["teacher"],
            "student_preset": config.preset,
            "alpha": options["alpha"],
            "temperature": options["temperature"],
            "eval_examples": len(data.held_out),
        } | distillation_report(
            model.student, model.teacher, accuracy(model.student, eval_data, labels),
            accuracy(model.teacher, eval_data, labels),
        )
        (out / DISTILLATION_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return {"distillation": report}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        metrics = summary["metrics"]
        return [
            trained_line(
                summary, f"held-out distillation loss {metrics['loss']:.4f}, student accuracy {metrics['accuracy']:.4f}"
            ),
            format_distillation(summary["distillation"]),
            f"distillation: {Path(summary['output']) / DISTILLATION_FILE}",
        ]


TASK = DistillationTask
