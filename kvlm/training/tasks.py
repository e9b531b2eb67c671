"""Training and evaluation of the retrieval (`DualEncoder`) and captioning (`Captioner`) tasks.

`kvlm.training.fit` trains these when `TrainConfig.task` is `retrieval` or `captioning`
(and `kvlm.training.evaluate` scores them): the same examples, vocabulary, tokenizer,
optimizer (AdamW, warm-up and cosine decay), callbacks and run folder as the vqa task,
without `answers.txt`. These tasks train on one device (`auto` or `one_device`).

- retrieval: `DualEncoder` with the CLIP or SigLIP loss (`TrainConfig.loss`) on image-caption
  pairs (`make_pair_dataset`; identical captions are positives of each other). Scored by
  recall@1/5/10 in both directions (`kvlm.models.retrieval`).
- captioning: `Captioner` trained with teacher forcing (`make_caption_dataset`), with
  sequences of at least `CAPTION_SEQUENCE_LENGTH` tokens. Scored by corpus BLEU-4 of its
  greedy captions (`kvlm.models.captioning`).

The distillation task (a dense `VLMClassifier` student of a trained vqa run, with
`answers.txt`) lives in `kvlm.training.distillation`, the rag task (a `RetrievalAugmentedVLM`
on product catalogues) in `kvlm.training.rag`; `fit_task` dispatches to them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kvlm.data import make_caption_dataset, make_pair_dataset
from kvlm.models import Captioner, DualEncoder
from kvlm.models.contrastive import LOSSES
from kvlm.training.callbacks import restored_step
from kvlm.training.distribution import Distribution, make_distribution
from kvlm.training.run import (
    BACKUP_DIR,
    MODEL_FILE,
    RUN_FILE,
    TrainConfig,
    _output_dir,
    _prepare,
    _summary,
    _write_run_files,
    fit_resumed,
    make_optimizer,
    run_callback_list,
)

TASKS = ("vqa", "retrieval", "captioning", "distillation", "rag")
TASK_HELP = (
    "vqa: image+question -> answer; retrieval: CLIP/SigLIP dual encoder; captioning: image -> caption; "
    "distillation: a small dense student from a trained VQA teacher (--teacher); "
    "rag: answers from a knowledge base (product catalogues) by retrieval"
)
# Sizes for `kvlm train --task ...` when not given (retrieval, captioning and rag: as in bench/).
# Distillation takes its data and sizes from the teacher run (`kvlm.training.distillation.DATA_FIELDS`).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqa": dict(train_size=24000, eval_size=2000, epochs=8, batch_size=64, learning_rate=2e-3),
    "retrieval": dict(train_size=4096, eval_size=512, epochs=10, batch_size=64, learning_rate=1e-3),
    "captioning": dict(train_size=3072, eval_size=512, epochs=4, batch_size=32, learning_rate=2e-3),
    "distillation": dict(epochs=8, batch_size=64, learning_rate=2e-3),
    "rag": dict(train_size=12000, eval_size=1000, epochs=8, batch_size=64, learning_rate=1e-3),
}
# Strategies the retrieval, captioning, distillation and rag tasks accept: they train on one device.
TASK_STRATEGIES = ("auto", "one_device")
# Shortest caption sequence (`[CLS] words [SEP]`, padded) a captioning run uses.
CAPTION_SEQUENCE_LENGTH = 32
# Generated captions shown beside the captioning report.
SAMPLE_CAPTIONS = 5


def check_task(config: TrainConfig) -> None:
    """Raises `ValueError` for an unknown task or loss, or options the task cannot use
    (distillation: see `kvlm.training.distillation.check_distillation`; rag:
    `kvlm.training.rag.check_rag`)."""
    if config.task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}. Received: task={config.task!r}")
    if config.task == "distillation":
        from kvlm.training.distillation import check_distillation

        check_distillation(config)
    if config.task == "rag":
        from kvlm.training.rag import check_rag

        check_rag(config)
    if config.task == "retrieval":
        if config.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}. Received: loss={config.loss!r}")
        if "moe" in config.overrides:
            raise ValueError(
                "The retrieval task's DualEncoder has no fusion stack to put SparseMoE layers in: "
                "drop `--moe-experts` (the vqa and captioning tasks take it)."
            )


def task_config(config: TrainConfig) -> TrainConfig:
    """`config` with the task's required sizes: captioning gets sequences of at least
    `CAPTION_SEQUENCE_LENGTH` tokens (`overrides["sequence_length"]`), distillation its
    teacher's data (`kvlm.training.distillation.distillation_config`)."""
    check_task(config)
    if config.task == "distillation":
        from kvlm.training.distillation import distillation_config

        return distillation_config(config)
    if config.task != "captioning":
        return config
    from kvlm.models import get_preset

    length = config.overrides.get("sequence_length", get_preset(config.preset)["sequence_length"])
    return replace(config, overrides={**config.overrides, "sequence_length": max(length, CAPTION_SEQUENCE_LENGTH)})


def task_distribution(task: str, strategy: str | Distribution | None = "auto") -> Distribution:
    """The one-device `Distribution` of a retrieval, captioning, distillation or rag run.

    `auto` (or None) means no strategy, `one_device` a `tf.distribute.OneDeviceStrategy`
    on TensorFlow; a `Distribution` must have one replica on one worker.

    Raises:
        ValueError: For any other strategy (they are vqa-only).
    """
    if isinstance(strategy, Distribution):
        if strategy.batch_shards == 1 and strategy.num_workers == 1:
            return strategy
        name = strategy.name
    elif strategy in (None, "auto"):
        return make_distribution(None)
    elif strategy == "one_device":
        return make_distribution("one_device")
    else:
        name = strategy
    raise ValueError(
        f"Strategy {name!r} is supported for the vqa task only; the {task} task trains on one device. "
        f"Use --strategy {' or '.join(TASK_STRATEGIES)} (or --task vqa)."
    )


def build_task_model(config: TrainConfig, vocabulary_size: int, steps: int) -> keras.Model:
    """The task's model from the preset (and `config.overrides`), compiled with `make_optimizer`."""
    if config.task == "retrieval":
        model = DualEncoder.from_preset(
            config.preset, vocabulary_size=vocabulary_size, loss=config.loss, encoder=config.encoder,
            **config.overrides,
        )
    elif config.task == "captioning":
        model = Captioner.from_preset(
            config.preset, vocabulary_size=vocabulary_size, encoder=config.encoder, **config.overrides
        )
    else:
        raise ValueError(f"`task` must be 'retrieval' or 'captioning'. Received: task={config.task!r}")
    model.compile(optimizer=make_optimizer(config, steps))
    return model


def task_dataset(
    task: str, examples, tokenizer, image_size: int, batch_size: int,
    shuffle: bool = False, augment: bool = False, seed=0,
) -> tf.data.Dataset:
    """`make_pair_dataset` (retrieval) or `make_caption_dataset` (captioning) batches."""
    make = {"retrieval": make_pair_dataset, "captioning": make_caption_dataset}[task]
    return make(examples, tokenizer, image_size, batch_size, shuffle=shuffle, augment=augment, seed=seed)


def _stream(make_pass: Callable[[tf.Tensor], tf.data.Dataset], seed: int, first_pass: int = 0) -> tf.data.Dataset:
    """Endless batches from pass `first_pass` on; pass `p` is `make_pass(seed * 1_000_003 + p)`.

    As `kvlm.training.run.training_stream`: every pass is built in `flat_map` with its own
    shuffle seed, so a run resumed at step `n` continues with the same batches.
    """

    @tf.autograph.experimental.do_not_convert
    def one_pass(index):
        tf.random.set_seed(seed + 1)  # the pass graph's seed (a tensor op seed needs a non-zero one)
        return make_pass(tf.constant(seed, tf.int64) * 1_000_003 + index)

    return tf.data.Dataset.counter(first_pass).flat_map(one_pass)


def fit_task(
    config: TrainConfig,
    strategy: str | Distribution | None = "auto",
    callbacks: list | None = None,
    verbose: int | str = "auto",
    *,
    checkpoint: bool = True,
    backup_freq: int | str | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Trains the retrieval or captioning model of `config.task` and writes the run folder.

    The distillation task is trained by `kvlm.training.distillation.fit_distillation`, the
    rag task by `kvlm.training.rag.fit_rag` (same arguments).

    Arguments as for `kvlm.training.fit`, but `strategy` must be `auto`, `one_device`
    (or a one-replica `Distribution`; see `task_distribution`). The run folder holds
    `model.keras`, `vocabulary.txt`, `run.json` (the config, with the task's sizes),
    and with `checkpoint` `checkpoint.keras`, `history.csv` and `training_curves.png`.

    Returns the summary of `fit` with `task`; the held-out `metrics` hold the loss, and
    for retrieval `recall` holds recall@1/5/10 in both directions.
    """
    if config.task == "distillation":
        from kvlm.training.distillation import fit_distillation

        return fit_distillation(
            config, strategy, callbacks, verbose,
            checkpoint=checkpoint, backup_freq=backup_freq, tensorboard=tensorboard,
        )
    if config.task == "rag":
        from kvlm.training.rag import fit_rag

        return fit_rag(
            config, strategy, callbacks, verbose,
            checkpoint=checkpoint, backup_freq=backup_freq, tensorboard=tensorboard,
        )
    config = task_config(config)
    distribution = task_distribution(config.task, strategy)
    out = _output_dir(config, distribution)
    out.mkdir(parents=True, exist_ok=True)
    train_examples, eval_examples, preset, vocabulary, _, tokenizer = _prepare(config)
    if not train_examples or not eval_examples:
        raise ValueError(
            f"The {config.task} task needs training and held-out examples. "
            f"Received: {len(train_examples)} train, {len(eval_examples)} held-out."
        )
    image_size = preset["image_size"]
    steps_per_epoch = -(-len(train_examples) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    # Contrastive held-out loss in training-sized batches (the same number of negatives).
    eval_batch = config.batch_size if config.task == "retrieval" else 256
    eval_data = task_dataset(config.task, eval_examples, tokenizer, image_size, eval_batch)

    with distribution.scope():
        model = build_task_model(config, len(vocabulary), total_steps)
        model.optimizer.build(model.trainable_variables)
    backup_dir = out / BACKUP_DIR
    done = restored_step(model, backup_dir) if backup_freq is not None else 0
    _write_run_files(out, config, vocabulary, None)

    run_callbacks = run_callback_list(
        out, callbacks, done=done, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        checkpoint=checkpoint, backup_freq=backup_freq, tensorboard=tensorboard,
    )

    stream = _stream(
        lambda seed: task_dataset(
            config.task, train_examples, tokenizer, image_size, config.batch_size,
            shuffle=True, augment=config.augment, seed=seed,
        ),
        config.seed, first_pass=done // steps_per_epoch,
    )
    history, seconds = fit_resumed(
        model, stream, done=done, steps_per_epoch=steps_per_epoch, epochs=config.epochs, eval_data=eval_data,
        callbacks=run_callbacks, verbose=verbose,
    )
    model.save(out / MODEL_FILE)
    metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
    summary = _summary(history, metrics, seconds, train_examples, eval_examples, [], out)
    del summary["num_classes"]
    summary |= {
        "task": config.task,
        "strategy": distribution.name,
        "replicas": 1,
        "workers": 1,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_from_step": done,
    }
    if config.task == "retrieval":
        summary["recall"] = retrieval_report(model, tokenizer, config, eval_examples)["recall"]
    return summary


def retrieval_report(model: DualEncoder, tokenizer, config: TrainConfig, examples: Sequence) -> dict[str, Any]:
    """Recall@1/5/10 of image->text and text->image retrieval over `examples`' pairs.

    Returns `task`, `loss` (the contrastive loss type), `examples`, `distinct_captions`,
    `recall` (`{"image_to_text": {"recall@1": ...}, "text_to_image": ...}`) and `chance`
    (the recall of a random ranking). Identical captions count as matches.
    """
    from kvlm.models.retrieval import DEFAULT_KS, chance_recall_at_k, embed_pairs, recall_at_k

    data = make_pair_dataset(examples, tokenizer, model.image_size, 256)
    images, texts = embed_pairs(model, data)
    captions = [e.caption for e in examples]
    return {
        "task": "retrieval",
        "loss": model.loss_type,
        "examples": len(examples),
        "distinct_captions": len(set(captions)),
        "recall": recall_at_k(images, texts, DEFAULT_KS, captions=captions),
        "chance": chance_recall_at_k(captions, DEFAULT_KS),
    }


def captioning_report(model: Captioner, tokenizer, config: TrainConfig, examples: Sequence) -> dict[str, Any]:
    """BLEU-4 of the greedy captions of `examples`' images against their captions.

    Returns `task`, `examples`, `sampler`, `bleu` (corpus BLEU-4 in [0, 1]), `exact_match`
    (the share of captions equal to the lower-cased reference) and `samples` (the first
    `SAMPLE_CAPTIONS` `{"reference", "caption"}` pairs).
    """
    from kvlm.models.captioning import bleu_score, generate_captions

    captions: list[str] = []
    # The input pipeline decodes and resizes in-memory images and image files alike.
    for features, _ in make_caption_dataset(examples, tokenizer, model.image_size, 128):
        captions += generate_captions(model, np.asarray(features["images"]), tokenizer, sampler="greedy")
    references = [e.caption for e in examples]
    exact = np.mean([c == " ".join(r.lower().split()) for c, r in zip(captions, references)])
    return {
        "task": "captioning",
        "examples": len(examples),
        "sampler": "greedy",
        "bleu": bleu_score(references, captions),
        "exact_match": float(exact),
        "samples": [{"reference": r, "caption": c} for r, c in zip(references[:SAMPLE_CAPTIONS], captions)],
    }


def evaluate_task(model: keras.Model, tokenizer, config: TrainConfig, examples: Sequence) -> dict[str, Any]:
    """The report of a retrieval (`retrieval_report`) or captioning (`captioning_report`) run."""
    if not examples:
        raise ValueError("No examples to evaluate.")
    if config.task == "retrieval":
        return retrieval_report(model, tokenizer, config, examples)
    if config.task == "captioning":
        return captioning_report(model, tokenizer, config, examples)
    raise ValueError(f"`task` must be 'retrieval' or 'captioning'. Received: task={config.task!r}")


def format_task_report(report: dict[str, Any]) -> str:
    """A retrieval or captioning report (from `evaluate_task`) as text."""
    if report["task"] == "retrieval":
        ks = list(report["chance"])
        header = f"{'direction':<16}" + "".join(f"{k:>12}" for k in ks)
        rows = [
            f"{direction:<16}" + "".join(f"{values[k]:>12.4f}" for k in ks)
            for direction, values in (*report["recall"].items(), ("chance", report["chance"]))
        ]
        return "\n".join([
            f"retrieval ({report['loss']} loss): {report['examples']} image-caption pairs, "
            f"{report['distinct_captions']} distinct captions (identical captions count as matches)",
            "",
            header,
            "-" * len(header),
            *rows,
        ])
    if report["task"] == "captioning":
        lines = [
            f"captioning: {report['examples']} images, {report['sampler']} decoding",
            f"          BLEU-4: {report['bleu']:.4f}",
            f"   exact caption: {report['exact_match']:.4f}",
            "",
            "examples:",
        ]
        for sample in report["samples"]:
            lines += [f"  reference: {sample['reference']}", f"  generated: {sample['caption']}"]
        return "\n".join(lines)
    raise ValueError(f"Not a retrieval or captioning report: task={report.get('task')!r}")


def export_description(task: str) -> str:
    """The SavedModel signature a run of `task` is exported with, its inputs and outputs."""
    from kvlm.export.signatures import (
        CAPTION_INPUT_NAMES,
        CAPTION_OUTPUT_NAMES,
        CAPTION_SIGNATURE_NAME,
        EMBED_OUTPUT_NAMES,
        EMBED_SIGNATURE_NAME,
        INPUT_NAMES,
        OUTPUT_NAMES,
        SIGNATURE_NAME,
    )

    inputs, outputs, name = {
        "vqa": (INPUT_NAMES, OUTPUT_NAMES, SIGNATURE_NAME),
        "distillation": (INPUT_NAMES, OUTPUT_NAMES, SIGNATURE_NAME),  # the student VLMClassifier
        "rag": (INPUT_NAMES, OUTPUT_NAMES, f"{SIGNATURE_NAME} (answers from the model's built-in index)"),
        "retrieval": (INPUT_NAMES, EMBED_OUTPUT_NAMES, f"{EMBED_SIGNATURE_NAME} (also {SIGNATURE_NAME})"),
        "captioning": (
            CAPTION_INPUT_NAMES, CAPTION_OUTPUT_NAMES, f"{CAPTION_SIGNATURE_NAME} (also {SIGNATURE_NAME})"
        ),
    }[task]
    return f"signature {name}: {', '.join(inputs)} -> {', '.join(outputs)}"


def read_task(run_dir: str | Path) -> str:
    """The task of a run folder (from its `run.json`; `vqa` for runs written before tasks)."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"No {RUN_FILE} in {run_dir}: train a model there first (`kvlm train`).")
    return json.loads(path.read_text(encoding="utf-8")).get("task", "vqa")
