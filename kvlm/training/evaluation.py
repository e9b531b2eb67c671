"""`evaluate(run_dir)`: a trained run scored by its task on held-out data (`kvlm evaluate`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvlm.data import load_folder, make_dataset
from kvlm.runs import load_run
from kvlm.tasks import get_task


def evaluate(run_dir: str | Path, data_dir: str | None = None, size: int | None = None) -> dict[str, Any]:
    """Evaluates a saved run on its held-out split (`size` examples; default its `eval_size`) or on `data_dir`.

    The report is the task's: for classifier runs (vqa, distillation, rag) `loss`, `accuracy`,
    `macro_precision`, `macro_recall`, `macro_f1`, `examples` and `per_domain`; retrieval
    runs recall@1/5/10, captioning runs BLEU-4 and example captions (both marked by `task`).

    Raises:
        ValueError: There are no examples to evaluate.
    """
    run = load_run(run_dir)
    task = get_task(run.config.task)
    examples = load_folder(data_dir) if data_dir is not None else task.evaluation_examples(run, size)
    if not examples:
        raise ValueError("No examples to evaluate.")
    return task.evaluate(run, examples, held_out=data_dir is None)


def answer_accuracy(model, examples: Sequence, tokenizer, answers: Sequence[str], image_size: int) -> float:
    """Fraction of `examples` whose top answer is right; an answer outside `answers` counts as wrong."""
    known = [e for e in examples if e.answer in answers]
    if not known:
        return 0.0
    logits = model.predict(make_dataset(known, tokenizer, answers, image_size, 256), verbose=0)
    predicted = np.asarray(answers)[np.argmax(logits, axis=-1)]
    return float(np.sum(predicted == np.asarray([e.answer for e in known])) / len(examples))
