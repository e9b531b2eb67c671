"""The captioning task: a `Captioner` trained with teacher forcing, scored by BLEU-4 of its greedy captions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kvlm.data import make_caption_dataset
from kvlm.export.savedmodel import write_captioner_saved_model
from kvlm.export.signatures import CAPTION_INPUT_NAMES, CAPTION_OUTPUT_NAMES, CAPTION_SIGNATURE_NAME, SIGNATURE_NAME
from kvlm.models import Captioner
from kvlm.models.captioning import bleu_score, generate_captions
from kvlm.runs import Run, TrainConfig
from kvlm.tasks.base import Task, TrainData, make_optimizer, trained_line
from kvlm.tasks.captioning import INFO

# Shortest caption sequence (`[CLS] words [SEP]`, padded) a captioning run uses.
CAPTION_SEQUENCE_LENGTH = 32
# Generated captions shown beside the captioning report.
SAMPLE_CAPTIONS = 5


def captioning_report(model: Captioner, tokenizer, examples: Sequence) -> dict[str, Any]:
    """BLEU-4 of the greedy captions of `examples`' images against their captions.

    Returns `task`, `examples`, `sampler`, `bleu` (corpus BLEU-4 in [0, 1]), `exact_match`
    (the share of captions equal to the lower-cased reference) and `samples` (the first
    `SAMPLE_CAPTIONS` `{"reference", "caption"}` pairs).
    """
    captions: list[str] = []
    # The input pipeline decodes and resizes in-memory images and image files alike.
    for features, _ in make_caption_dataset(examples, tokenizer, model.image_size, 128):
        captions += generate_captions(model, np.asarray(features["images"]), tokenizer, sampler="greedy")
    references = [e.caption for e in examples]
    exact = np.mean([c == " ".join(r.lower().split()) for c, r in zip(captions, references)])
    return {
        "task": INFO.name,
        "examples": len(examples),
        "sampler": "greedy",
        "bleu": bleu_score(references, captions),
        "exact_match": float(exact),
        "samples": [{"reference": r, "caption": c} for r, c in zip(references[:SAMPLE_CAPTIONS], captions)],
    }


class CaptioningTask(Task):
    """`Captioner.from_preset(config.preset, ...)` with sequences of at least `CAPTION_SEQUENCE_LENGTH` tokens."""

    info = INFO
    export_description = (
        f"signature {CAPTION_SIGNATURE_NAME} (also {SIGNATURE_NAME}): {', '.join(CAPTION_INPUT_NAMES)} -> "
        f"{', '.join(CAPTION_OUTPUT_NAMES)}"
    )

    def configure(self, config: TrainConfig) -> TrainConfig:
        length = self.preset(config)["sequence_length"]
        return replace(config, overrides={**config.overrides, "sequence_length": max(length, CAPTION_SEQUENCE_LENGTH)})

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        model = Captioner.from_preset(
            config.preset, vocabulary_size=len(data.vocabulary), encoder=config.encoder, **config.overrides
        )
        model.compile(optimizer=make_optimizer(config, steps))
        return model

    def batches(self, data, examples, batch_size, shuffle=False, augment=False, seed=0) -> tf.data.Dataset:
        return make_caption_dataset(
            examples, data.tokenizer, data.image_size, batch_size, shuffle=shuffle, augment=augment, seed=seed
        )

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        return [trained_line(
            summary, f"held-out token loss {summary['metrics']['loss']:.4f} "
            f"(`kvlm evaluate --model {summary['output']}` for BLEU-4)",
        )]

    def evaluate(self, run: Run, examples: Sequence, held_out: bool = True) -> dict[str, Any]:
        return captioning_report(run.model, run.tokenizer, examples)

    def format_report(self, report: dict[str, Any]) -> str:
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

    def export(self, run: Run, path: Path, model_name: str, platforms: Sequence[str] | None = None) -> Path:
        return write_captioner_saved_model(run.model, run.tokenizer, path, model_name, platforms)


TASK = CaptioningTask
