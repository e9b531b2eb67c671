"""The tiny VLM learns the procedural VQA task from scratch on the CPU, through the product loop.

Chance is 1/17 answers uniformly; a question-only model can at best pick among the answers of
the question's type (4 colours, 3 shapes, 3 positions, 3 counts, 2 sizes, yes/no):
(1/4 + 1/3 + 1/3 + 1/3 + 1/2 + 1/2) / 6 = 0.375.
"""

import numpy as np
import pytest

from kvlm.data import shapes
from kvlm.runs import TrainConfig, load_run
from kvlm.training import fit

pytestmark = pytest.mark.long

QUESTION_ONLY_ACCURACY = 0.375


def _served_answers_right(run, count: int, seed: int) -> int:
    held_out = shapes.generate(count, seed=seed)
    images = np.stack([e.image for e in held_out]).astype("float32") / 255.0
    logits = run.model.predict(
        {"images": images, "token_ids": run.tokenizer([e.question for e in held_out])}, verbose=0
    )
    return sum(run.answers[i] == e.answer for i, e in zip(logits.argmax(-1), held_out))


@pytest.mark.tensorflow_only
def test_short_run_uses_the_image_beyond_the_question_only_level(tmp_path):
    # 500 steps: past the question-only level (0.586 measured), well before the binding plateau breaks.
    config = TrainConfig(output=str(tmp_path / "run"), train_size=8000, eval_size=1000, epochs=4)
    summary = fit(config, strategy=None, verbose=0, checkpoint=False)
    assert summary["metrics"]["accuracy"] >= QUESTION_ONLY_ACCURACY + 0.125
    losses = summary["history"]["loss"]
    assert losses[-1] < 0.7 * losses[0]
    run = load_run(config.output)
    assert run.answers == sorted(shapes.ANSWERS)


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_default_vqa_run_reaches_95_percent_on_held_out_split(tmp_path):
    # The main job's configuration (the vqa task's defaults): 36,000 examples, 8 epochs.
    config = TrainConfig(output=str(tmp_path / "run"))
    summary = fit(config, strategy=None, verbose=0, checkpoint=False)
    assert summary["metrics"]["accuracy"] >= 0.95
    losses = summary["history"]["loss"]
    assert losses[-1] < 0.1 * losses[0]
    # The saved run reloads and answers new questions the same way.
    assert _served_answers_right(load_run(config.output), 8, seed=config.seed + 10_000) >= 7
