"""The tiny VLM learns the procedural VQA task from scratch on the CPU."""

import time

import numpy as np
import pytest

from kvlm.data import shapes
from kvlm.training import TrainConfig, load_run, train


@pytest.mark.tensorflow_only
def test_tiny_model_reaches_90_percent_on_held_out_split(tmp_path):
    # Chance: 1/17 answers uniformly; a question-only model can at best pick among the
    # answers of the question's type (4 colours, 3 shapes, 3 positions, 3 counts, 2 sizes,
    # yes/no): (1/4 + 1/3 + 1/3 + 1/3 + 1/2 + 1/2) / 6 = 0.375.
    config = TrainConfig(output=str(tmp_path / "run"), train_size=24000, eval_size=2000, epochs=8)
    start = time.perf_counter()
    summary = train(config, verbose=0)
    minutes = (time.perf_counter() - start) / 60
    accuracy = summary["metrics"]["accuracy"]
    print(f"held-out accuracy {accuracy:.4f} after {minutes:.1f} min")
    assert accuracy >= 0.90
    losses = summary["history"]["loss"]
    assert losses[-1] < 0.2 * losses[0]
    # The saved run reloads and answers the held-out questions the same way.
    model, tokenizer, answers, _ = load_run(config.output)
    assert answers == sorted(shapes.ANSWERS)
    held_out = shapes.generate(8, seed=config.seed + 10_000)
    images = np.stack([e.image for e in held_out]).astype("float32") / 255.0
    logits = model.predict({"images": images, "token_ids": tokenizer([e.question for e in held_out])}, verbose=0)
    assert sum(answers[i] == e.answer for i, e in zip(logits.argmax(-1), held_out)) >= 6
