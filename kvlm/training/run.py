"""Training and evaluation of the VQA classifier on a dataset, written to a run folder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kvlm.data import (
    answer_vocabulary,
    build_vocabulary,
    load_folder,
    load_vocabulary,
    make_dataset,
    make_tokenizer,
    save_vocabulary,
    shapes,
)
from kvlm.models import VLMClassifier, get_preset

MODEL_FILE = "model.keras"
ANSWERS_FILE = "answers.txt"
RUN_FILE = "run.json"


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


def load_examples(config: TrainConfig):
    """Returns `(train, eval)` examples: the procedural set, or a user folder split by seed."""
    image_size = get_preset(config.preset)["image_size"]
    if config.data_dir is None:
        return (
            shapes.generate(config.train_size, seed=config.seed, image_size=image_size),
            shapes.generate(config.eval_size, seed=config.seed + 10_000, image_size=image_size),
        )
    examples = load_folder(config.data_dir)
    order = np.random.default_rng(config.seed).permutation(len(examples))
    cut = max(1, int(round(len(examples) * config.eval_fraction)))
    return [examples[i] for i in order[cut:]], [examples[i] for i in order[:cut]]


def compile_classifier(model: keras.Model, config: TrainConfig, steps: int) -> None:
    """AdamW with linear warm-up and cosine decay, sparse categorical cross-entropy."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps, 1), warmup_target=config.learning_rate, warmup_steps=max(steps // 20, 1)
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def train(config: TrainConfig, callbacks: list | None = None, verbose: int | str = "auto") -> dict[str, Any]:
    """Trains a `VLMClassifier`, evaluates it on the held-out split and saves the run.

    Returns a summary with the held-out metrics, training time and paths.
    """
    keras.utils.set_random_seed(config.seed)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    train_examples, eval_examples = load_examples(config)
    preset = get_preset(config.preset)
    preset.update(config.overrides)
    vocabulary = build_vocabulary(
        [e.question for e in train_examples] + [e.caption for e in train_examples], config.vocabulary_size
    )
    answers = answer_vocabulary(train_examples)
    tokenizer = make_tokenizer(vocabulary, preset["sequence_length"])
    train_data = make_dataset(
        train_examples, tokenizer, answers, preset["image_size"], config.batch_size,
        shuffle=True, augment=config.augment, seed=config.seed,
    )
    eval_data = make_dataset(eval_examples, tokenizer, answers, preset["image_size"], 256)

    model = VLMClassifier.from_preset(
        config.preset, num_classes=len(answers), vocabulary_size=len(vocabulary),
        encoder=config.encoder, **config.overrides,
    )
    steps = config.epochs * -(-len(train_examples) // config.batch_size)
    compile_classifier(model, config, steps)
    save_vocabulary(vocabulary, out)
    (out / ANSWERS_FILE).write_text("\n".join(answers) + "\n", encoding="utf-8")
    (out / RUN_FILE).write_text(json.dumps(asdict(config), indent=2), encoding="utf-8")

    start = time.perf_counter()
    history = model.fit(
        train_data, validation_data=eval_data, epochs=config.epochs, callbacks=callbacks or [], verbose=verbose
    )
    seconds = time.perf_counter() - start
    model.save(out / MODEL_FILE)
    metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_seconds": seconds,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "num_classes": len(answers),
        "history": {k: [float(x) for x in v] for k, v in history.history.items()},
        "output": str(out),
    }


def load_run(run_dir: str | Path):
    """Loads `(model, tokenizer, answers, config)` from a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"No {MODEL_FILE} in {run_dir}: train a model there first (`kvlm train`).")
    config = TrainConfig(**json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")))
    model = keras.saving.load_model(run_dir / MODEL_FILE)
    vocabulary = load_vocabulary(run_dir)
    answers = (run_dir / ANSWERS_FILE).read_text(encoding="utf-8").split()
    tokenizer = make_tokenizer(vocabulary, model.backbone.sequence_length)
    return model, tokenizer, answers, config


def evaluate(run_dir: str | Path, data_dir: str | None = None, size: int | None = None) -> dict[str, float]:
    """Evaluates a saved run on its held-out split (or on `data_dir`)."""
    model, tokenizer, answers, config = load_run(run_dir)
    if data_dir is not None:
        examples = load_folder(data_dir)
    else:
        if size is not None:
            config.eval_size = size
        _, examples = load_examples(config)
    data = make_dataset(examples, tokenizer, answers, model.backbone.image_size, 256)
    metrics = model.evaluate(data, return_dict=True, verbose=0)
    return {k: float(v) for k, v in metrics.items()} | {"examples": len(examples)}
