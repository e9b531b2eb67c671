"""The `Task` base class: what a training task supplies to the shared loop and to its run folder.

`kvlm.training.fit` calls the hooks in this order: `configure` (before any TensorFlow op),
`prepare` (examples, vocabulary, tokenizer, answers), then inside the distribution scope
`pretrain` and `build_model`; it trains on `train_pass` (one shuffled pass, made endless and
resumable by the loop) against `eval_dataset`, saves `saved_model(model)` and merges
`after_training`'s report into the summary. `kvlm evaluate` uses `evaluation_examples`,
`evaluate` and `format_report`; `kvlm export` uses `export` and `export_description`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kvlm.data import answer_vocabulary, build_vocabulary, encode_answers, make_dataset, make_tokenizer
from kvlm.export.savedmodel import write_saved_model
from kvlm.export.signatures import INPUT_NAMES, OUTPUT_NAMES, SIGNATURE_NAME
from kvlm.models import VLMClassifier, get_preset
from kvlm.models.classifier import classifier_sizes
from kvlm.runs import CURVES_FILE, MODEL_FILE, Run, TrainConfig
from kvlm.tasks.info import TaskInfo
from kvlm.training.distribution import Distribution
from kvlm.training.examples import load_examples
from kvlm.training.reports import classification_report, format_report
from kvlm.training.schedules import WarmupCosineDecay


@dataclass
class TrainData:
    """What `Task.prepare` gives the loop.

    Attributes:
        train, held_out: The training and held-out examples.
        vocabulary: Tokens of `vocabulary.txt`.
        tokenizer: The tokenizer at the model's sequence length.
        image_size: The model's image side.
        answers: The labels of a classifier task (`answers.txt`), None for the others.
        extra: What else the task's hooks share (a teacher model, retrieved contexts, ...).
    """

    train: Sequence
    held_out: Sequence
    vocabulary: list[str]
    tokenizer: Any
    image_size: int
    answers: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_optimizer(config: TrainConfig, steps: int) -> keras.optimizers.Optimizer:
    """AdamW with a linear warm-up over 5% of `steps`, then cosine decay to 0 over `steps`."""
    schedule = WarmupCosineDecay(0.0, max(steps, 1), warmup_target=config.learning_rate, warmup_steps=max(steps // 20, 1))
    return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)


def trained_line(summary: dict[str, Any], held_out: str) -> str:
    """The first line `kvlm train` prints for a finished run."""
    resumed = f" (resumed at step {summary['resumed_from_step']})" if summary["resumed_from_step"] else ""
    out = Path(summary["output"])
    return (
        f"trained {summary['task']} on {summary['train_examples']} examples with strategy {summary['strategy']} "
        f"({summary['replicas']} replicas, {summary['workers']} workers) in {summary['train_seconds']:.0f}s"
        f"{resumed}; {held_out} on {summary['eval_examples']} examples; saved to {out / MODEL_FILE}; "
        f"curves in {out / CURVES_FILE}"
    )


class Task:
    """One training task. Subclasses set `info` and implement the model and data hooks."""

    info: TaskInfo
    # Batch of the held-out data during training.
    eval_batch: int = 256
    # The SavedModel signature `kvlm export` writes, as `kvlm export` describes it.
    export_description: str = ""

    # -- training ------------------------------------------------------------------------------

    def configure(self, config: TrainConfig) -> TrainConfig:
        """`config` checked and completed for the task; runs before any TensorFlow op.

        Raises:
            ValueError: For options the task cannot use or values out of range.
        """
        return config

    def preset(self, config: TrainConfig) -> dict[str, Any]:
        """The preset of `config` with its overrides; with a keras-hub `image_encoder`, the image
        size its preset takes."""
        preset = get_preset(config.preset) | config.overrides
        if isinstance(preset.get("image_encoder"), str):
            from kvlm.hub import preset_image_size

            preset["image_size"] = preset_image_size(preset["image_encoder"])
        return preset

    def examples(self, config: TrainConfig) -> tuple[list, list]:
        """`(train, held_out)` examples: `kvlm.training.examples.load_examples` by default."""
        return load_examples(config)

    def prepare(self, config: TrainConfig) -> TrainData:
        """`examples`, a vocabulary of their questions and captions, and the tokenizer (the loop
        has seeded Keras with `config.seed`)."""
        train, held_out = self.examples(config)
        preset = self.preset(config)
        vocabulary = build_vocabulary([e.question for e in train] + [e.caption for e in train], config.vocabulary_size)
        tokenizer = make_tokenizer(vocabulary, preset["sequence_length"])
        return TrainData(train, held_out, vocabulary, tokenizer, preset["image_size"])

    def pretrain(self, config: TrainConfig, data: TrainData, out: Path, resuming: bool) -> None:
        """Training before the model's (in the distribution scope); `resuming`: a backup exists."""

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        """The compiled model, trained for `steps` steps (in the distribution scope)."""
        raise NotImplementedError

    def batches(
        self, data: TrainData, examples: Sequence, batch_size: int, shuffle: bool = False, augment: bool = False,
        seed: tf.Tensor | int = 0,
    ) -> tf.data.Dataset:
        """`examples` as the model's batches (what `train_pass` and `eval_dataset` make by default)."""
        raise NotImplementedError

    def train_pass(self, config: TrainConfig, data: TrainData, seed: tf.Tensor) -> tf.data.Dataset:
        """One pass over the training examples in batches of `config.batch_size`, shuffled with `seed`."""
        return self.batches(data, data.train, config.batch_size, shuffle=True, augment=config.augment, seed=seed)

    def eval_dataset(self, config: TrainConfig, data: TrainData, examples: Sequence, batch_size: int) -> tf.data.Dataset:
        """Held-out batches (`examples` are `data.held_out`, trimmed to even batches where needed)."""
        return self.batches(data, examples, batch_size)

    def checkpoint_callback(self, path: Path) -> keras.callbacks.Callback:
        """The callback that writes `checkpoint.keras` every epoch."""
        return keras.callbacks.ModelCheckpoint(path)

    def saved_model(self, model: keras.Model) -> keras.Model:
        """The model `model.keras` holds (the trained model by default)."""
        return model

    def after_training(
        self, config: TrainConfig, data: TrainData, model: keras.Model, out: Path, distribution: Distribution
    ) -> dict[str, Any]:
        """Reports written beside the model, merged into the run's summary."""
        return {}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """What `kvlm train` prints for a finished run."""
        return [trained_line(summary, f"held-out loss {summary['metrics']['loss']:.4f}")]

    # -- a trained run folder --------------------------------------------------------------------

    def evaluation_examples(self, run: Run, size: int | None = None) -> list:
        """The run's held-out examples (`size` of them; default its `eval_size`)."""
        config = run.config if size is None else replace(run.config, eval_size=size)
        return self.examples(config)[1]

    def evaluate(self, run: Run, examples: Sequence, held_out: bool = True) -> dict[str, Any]:
        """The report `kvlm evaluate` prints; `held_out`: `examples` are the run's own held-out data."""
        raise NotImplementedError

    def format_report(self, report: dict[str, Any]) -> str:
        """An `evaluate` report as text."""
        raise NotImplementedError

    def export(self, run: Run, path: Path, model_name: str, platforms: Sequence[str] | None = None) -> Path:
        """Writes the run's SavedModel at `path` (see `kvlm.export.savedmodel`)."""
        raise NotImplementedError

    def dual_encoder(self, run: Run) -> keras.Model:
        """The dual encoder that embeds knowledge-base entries (`kvlm index build`)."""
        raise ValueError(
            f"{run.path} is a {self.info.name} run holding a {type(run.model).__name__}; an index needs a "
            "`kvlm train --task retrieval` or `kvlm train --task rag` run."
        )


class ClassifierTask(Task):
    """A task whose model maps images and questions to logits over `answers.txt`: by default
    `VLMClassifier.from_preset(config.preset, encoder=config.encoder, **config.overrides)`."""

    export_description = f"signature {SIGNATURE_NAME}: {', '.join(INPUT_NAMES)} -> {', '.join(OUTPUT_NAMES)}"

    def prepare(self, config: TrainConfig) -> TrainData:
        data = super().prepare(config)
        data.answers = answer_vocabulary(data.train)
        return data

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        model = VLMClassifier.from_preset(
            config.preset, num_classes=len(data.answers), vocabulary_size=len(data.vocabulary),
            encoder=config.encoder, **config.overrides,
        )
        return self.compile(model, config, steps)

    def compile(self, model: keras.Model, config: TrainConfig, steps: int) -> keras.Model:
        """AdamW with warm-up and cosine decay, sparse categorical cross-entropy, accuracy."""
        model.compile(
            optimizer=make_optimizer(config, steps),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        return model

    def batches(self, data, examples, batch_size, shuffle=False, augment=False, seed=0) -> tf.data.Dataset:
        return make_dataset(
            examples, data.tokenizer, data.answers, data.image_size, batch_size, shuffle=shuffle, augment=augment,
            seed=seed,
        )

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        metrics = summary["metrics"]
        return [trained_line(
            summary, f"held-out loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f} "
            f"({summary['num_classes']} answers)",
        )]

    def evaluate(self, run: Run, examples: Sequence, held_out: bool = True) -> dict[str, Any]:
        """Loss, accuracy, macro precision / recall / F1, `examples` and `per_domain`."""
        data = make_dataset(examples, run.tokenizer, run.answers, classifier_sizes(run.model)[0], 256)
        logits = np.asarray(run.model.predict(data, verbose=0), dtype=np.float64)
        labels = encode_answers(examples, run.answers)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        loss = float(-log_probs[np.arange(len(labels)), labels].mean())
        return {"loss": loss} | classification_report(labels, logits.argmax(axis=-1), [e.domain for e in examples])

    def format_report(self, report: dict[str, Any]) -> str:
        return format_report(report)

    def export(self, run: Run, path: Path, model_name: str, platforms: Sequence[str] | None = None) -> Path:
        return write_saved_model(run.model, run.tokenizer, run.answers, path, model_name=model_name, platforms=platforms)
