"""The retrieval task: a `DualEncoder` with the CLIP or SigLIP loss on image-caption pairs.

Pairs come from `make_pair_dataset` (identical captions are positives of each other); runs
are scored by recall@1/5/10 in both directions (`kvlm.models.retrieval`) and exported with
the `embed` signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from kvlm.data import make_pair_dataset
from kvlm.export.savedmodel import write_dual_encoder_saved_model
from kvlm.export.signatures import EMBED_OUTPUT_NAMES, EMBED_SIGNATURE_NAME, INPUT_NAMES, SIGNATURE_NAME
from kvlm.models import DualEncoder
from kvlm.models.contrastive import LOSSES
from kvlm.models.retrieval import DEFAULT_KS, chance_recall_at_k, embed_pairs, recall_at_k
from kvlm.runs import Run, TrainConfig
from kvlm.tasks.base import Task, TrainData, make_optimizer, trained_line
from kvlm.tasks.retrieval import INFO
from kvlm.training.distribution import Distribution


def retrieval_report(model: DualEncoder, tokenizer, examples: Sequence) -> dict[str, Any]:
    """Recall@1/5/10 of image->text and text->image retrieval over `examples`' pairs.

    Returns `task`, `loss` (the contrastive loss type), `examples`, `distinct_captions`,
    `recall` (`{"image_to_text": {"recall@1": ...}, "text_to_image": ...}`) and `chance`
    (the recall of a random ranking). Identical captions count as matches.
    """
    data = make_pair_dataset(examples, tokenizer, model.image_size, 256)
    images, texts = embed_pairs(model, data)
    captions = [e.caption for e in examples]
    return {
        "task": INFO.name,
        "loss": model.loss_type,
        "examples": len(examples),
        "distinct_captions": len(set(captions)),
        "recall": recall_at_k(images, texts, DEFAULT_KS, captions=captions),
        "chance": chance_recall_at_k(captions, DEFAULT_KS),
    }


class RetrievalTask(Task):
    """`DualEncoder.from_preset(config.preset, loss=options["loss"], ...)` trained with AdamW."""

    info = INFO
    eval_batch = None  # the contrastive held-out loss in training-sized batches (the same negatives)
    export_description = (
        f"signature {EMBED_SIGNATURE_NAME} (also {SIGNATURE_NAME}): {', '.join(INPUT_NAMES)} -> "
        f"{', '.join(EMBED_OUTPUT_NAMES)}"
    )

    def configure(self, config: TrainConfig) -> TrainConfig:
        loss = config.options["loss"]
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}. Received: loss={loss!r}")
        if "moe" in config.overrides:
            raise ValueError(
                "The retrieval task's DualEncoder has no fusion stack to put SparseMoE layers in: "
                "drop `--moe-experts` (the vqa and captioning tasks take it)."
            )
        return config

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        model = DualEncoder.from_preset(
            config.preset, vocabulary_size=len(data.vocabulary), loss=config.options["loss"],
            encoder=config.encoder, **config.overrides,
        )
        model.compile(optimizer=make_optimizer(config, steps))
        return model

    def batches(self, data, examples, batch_size, shuffle=False, augment=False, seed=0) -> tf.data.Dataset:
        return make_pair_dataset(
            examples, data.tokenizer, data.image_size, batch_size, shuffle=shuffle, augment=augment, seed=seed
        )

    def after_training(
        self, config: TrainConfig, data: TrainData, model: keras.Model, out: Path, distribution: Distribution
    ) -> dict[str, Any]:
        return {"recall": retrieval_report(model, data.tokenizer, data.held_out)["recall"]}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        recall = summary["recall"]
        return [trained_line(
            summary, f"held-out loss {summary['metrics']['loss']:.4f}, recall@1 image->text "
            f"{recall['image_to_text']['recall@1']:.4f}, text->image {recall['text_to_image']['recall@1']:.4f}",
        )]

    def evaluate(self, run: Run, examples: Sequence, held_out: bool = True) -> dict[str, Any]:
        return retrieval_report(run.model, run.tokenizer, examples)

    def format_report(self, report: dict[str, Any]) -> str:
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

    def export(self, run: Run, path: Path, model_name: str, platforms: Sequence[str] | None = None) -> Path:
        return write_dual_encoder_saved_model(run.model, run.tokenizer, path, model_name, platforms)

    def dual_encoder(self, run: Run) -> keras.Model:
        return run.model


TASK = RetrievalTask
