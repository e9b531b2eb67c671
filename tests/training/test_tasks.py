"""`kvlm train --task retrieval|captioning`, `kvlm evaluate` and `kvlm export` on tiny runs."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kvlm.cli import main
from kvlm.runs import TrainConfig, load_run
from kvlm.training import fit, load_examples
from kvlm.training.callbacks import read_history_csv

pytestmark = pytest.mark.long

# Procedural shapes, kvlm_tiny with the CNN encoder: seconds per epoch on a 2-core CPU.
RETRIEVAL = ["--train-size", "512", "--eval-size", "64", "--epochs", "4", "--batch-size", "32"]
CAPTIONING = ["--train-size", "256", "--eval-size", "16", "--epochs", "2", "--batch-size", "32"]
RUN_FILES = ("model.keras", "checkpoint.keras", "vocabulary.txt", "run.json", "history.csv",
             "training_curves.png", "summary.json")
# Held-out recall@10 must beat a random ranking by this much in both directions
# (measured: 0.92 against chance 0.19 for 64 pairs with 58 distinct captions).
RECALL_MARGIN = 0.25


def _train(tmp_path_factory, task: str, sizes: list[str]):
    out = tmp_path_factory.mktemp(task) / "run"
    code = main(["train", "--task", task, "--output", str(out), "--no-tensorboard", *sizes])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("trains on the TensorFlow backend only (slow elsewhere)")
    return _train(tmp_path_factory, "retrieval", RETRIEVAL)


@pytest.fixture(scope="module")
def captioning_run(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("trains on the TensorFlow backend only (slow elsewhere)")
    return _train(tmp_path_factory, "captioning", CAPTIONING)


def _reference_recall(model, tokenizer, examples) -> dict[str, dict[int, float]]:
    """Recall@1/5/10 from the model's embeddings with plain numpy: a hit is any pair with the same caption."""
    import tensorflow as tf

    from kvlm.models.captioning import images_of

    images = images_of(examples, model.image_size)
    token_ids = np.asarray(tokenizer(tf.constant([e.caption for e in examples])), "int32")
    outputs = model.predict({"images": images, "token_ids": token_ids}, verbose=0)
    similarity = outputs["image_embedding"] @ outputs["text_embedding"].T
    captions = np.array([e.caption for e in examples])
    same = captions[:, None] == captions[None, :]
    recall = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranked = np.argsort(-scores, axis=1, kind="stable")
        recall[direction] = {
            k: float(np.mean([same[i, ranked[i, :k]].any() for i in range(len(examples))])) for k in (1, 5, 10)
        }
    return recall


def _examples(count: int = 3):
    from kvlm.data import png_bytes, shapes

    examples = shapes.generate(count, seed=77)
    return examples, [png_bytes(e) for e in examples]


@pytest.mark.tensorflow_only
def test_retrieval_run_folder_evaluate_and_export(retrieval_run, tmp_path, capsys):
    import tensorflow as tf

    from kvlm.models import DualEncoder
    from kvlm.training import evaluate

    for name in RUN_FILES:
        assert (retrieval_run / name).is_file(), name
    assert not (retrieval_run / "answers.txt").exists() and not (retrieval_run / "backup").exists()
    config = json.loads((retrieval_run / "run.json").read_text())
    assert (config["task"], config["task_options"]) == ("retrieval", {"loss": "clip"})
    history = read_history_csv(retrieval_run / "history.csv")
    assert len(history["loss"]) == 4 and history["loss"][-1] < history["loss"][0]
    summary = json.loads((retrieval_run / "summary.json").read_text())
    assert summary["task"] == "retrieval" and summary["eval_examples"] == 64

    run = load_run(retrieval_run)
    model, tokenizer = run.model, run.tokenizer
    assert isinstance(model, DualEncoder) and run.answers == [] and run.config.task == "retrieval"
    assert tokenizer.sequence_length == model.sequence_length

    report = evaluate(retrieval_run)
    assert report["task"] == "retrieval" and report["examples"] == 64
    expected = _reference_recall(model, tokenizer, load_examples(run.config)[1])
    for direction in ("image_to_text", "text_to_image"):
        recall = report["recall"][direction]
        assert set(recall) == {"recall@1", "recall@5", "recall@10"}
        for k, value in expected[direction].items():
            assert recall[f"recall@{k}"] == pytest.approx(value), (direction, k)
        assert recall["recall@10"] >= report["chance"]["recall@10"] + RECALL_MARGIN, (direction, report)
    assert report["recall"] == summary["recall"]  # the same model, split and ranking

    assert main(["evaluate", "--model", str(retrieval_run)]) == 0
    text = capsys.readouterr().out
    for word in ("retrieval (clip loss)", "image_to_text", "text_to_image", "recall@10", "chance"):
        assert word in text

    assert main(["export", "--model", str(retrieval_run), "--base-path", str(tmp_path), "--name", "ret"]) == 0
    assert "signature embed" in capsys.readouterr().out
    loaded = tf.saved_model.load(str(tmp_path / "ret" / "1"))
    examples, images = _examples()
    texts = [e.caption for e in examples]
    outputs = loaded.signatures["embed"](image_bytes=tf.constant(images), text=tf.constant(texts))
    for name in ("image_embedding", "text_embedding"):
        assert outputs[name].dtype == tf.float32 and outputs[name].shape == (3, model.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(outputs[name].numpy(), axis=-1), 1.0, atol=1e-5)
    # The served text embeddings are the model's for the same tokens.
    token_ids = np.asarray(tokenizer(tf.constant(texts)), "int32")
    expected = model.text_model().predict(token_ids, verbose=0)
    np.testing.assert_allclose(outputs["text_embedding"].numpy(), expected, atol=1e-5)


@pytest.mark.tensorflow_only
def test_captioning_run_folder_evaluate_and_export(captioning_run, tmp_path, capsys):
    import tensorflow as tf

    from kvlm.models import Captioner
    from kvlm.models.captioning import bleu_score, generate_captions, images_of
    from kvlm.training import evaluate

    for name in RUN_FILES:
        assert (captioning_run / name).is_file(), name
    assert not (captioning_run / "answers.txt").exists()
    config = json.loads((captioning_run / "run.json").read_text())
    assert config["task"] == "captioning" and config["overrides"] == {"sequence_length": 32}
    history = read_history_csv(captioning_run / "history.csv")
    assert len(history["loss"]) == 2 and history["loss"][-1] < history["loss"][0]
    assert history["val_loss"][-1] < history["val_loss"][0]

    run = load_run(captioning_run)
    model, tokenizer = run.model, run.tokenizer
    assert isinstance(model, Captioner) and run.answers == []
    assert model.sequence_length == tokenizer.sequence_length == 32

    report = evaluate(captioning_run)
    assert report["task"] == "captioning" and report["examples"] == 16
    # The report scores the model's greedy captions of the held-out images, recomputed here.
    held_out = load_examples(run.config)[1]
    references = [e.caption for e in held_out]
    captions = generate_captions(model, images_of(held_out, model.image_size), tokenizer)
    assert report["bleu"] == pytest.approx(bleu_score(references, captions))
    exact = np.mean([c == " ".join(r.lower().split()) for c, r in zip(captions, references)])
    assert report["exact_match"] == pytest.approx(exact)
    assert report["samples"] == [{"reference": r, "caption": c} for r, c in zip(references[:5], captions)]
    assert report["bleu"] > 0.0 and all(c for c in captions)  # 2 epochs: BLEU-4 about 0.11

    assert main(["evaluate", "--model", str(captioning_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] == pytest.approx(report["bleu"])
    assert main(["evaluate", "--model", str(captioning_run)]) == 0
    text = capsys.readouterr().out
    assert "BLEU-4" in text and "reference:" in text and "generated:" in text

    assert main(["export", "--model", str(captioning_run), "--base-path", str(tmp_path), "--name", "cap"]) == 0
    assert "signature caption" in capsys.readouterr().out
    loaded = tf.saved_model.load(str(tmp_path / "cap" / "1"))
    examples, images = _examples()
    outputs = loaded.signatures["caption"](image_bytes=tf.constant(images))
    assert outputs["caption"].dtype == tf.string and outputs["caption"].shape == (3,)
    served = [c.decode() for c in outputs["caption"].numpy()]
    # PNG is lossless: the served captions are the model's greedy captions of the same images.
    assert served == generate_captions(model, images_of(examples, model.image_size), tokenizer)


class _Crash(RuntimeError):
    pass


class _CrashAtStep(keras.callbacks.Callback):
    def __init__(self, step: int):
        super().__init__()
        self.crash_step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.crash_step:
            raise _Crash(f"simulated crash at step {self.crash_step}")


@pytest.mark.tensorflow_only
def test_retrieval_run_resumes_from_its_backup_to_the_same_weights(tmp_path):
    sizes = dict(task="retrieval", train_size=128, eval_size=16, epochs=2, batch_size=32)  # 2 x 4 steps
    straight = fit(TrainConfig(output=str(tmp_path / "straight"), **sizes), backup_freq=3, verbose=0)
    config = TrainConfig(output=str(tmp_path / "resumed"), **sizes)
    with pytest.raises(_Crash):
        fit(config, backup_freq=3, verbose=0, callbacks=[_CrashAtStep(7)])
    resumed = fit(config, backup_freq=3, verbose=0)
    assert (resumed["resumed_from_step"], resumed["steps"], straight["steps"]) == (6, 8, 8)
    expected = keras.saving.load_model(tmp_path / "straight" / "model.keras").get_weights()
    for got, want in zip(keras.saving.load_model(tmp_path / "resumed" / "model.keras").get_weights(), expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("task", ["retrieval", "captioning"])
def test_multi_device_strategies_are_vqa_only(task, tmp_path, capsys):
    code = main(["train", "--task", task, "--strategy", "mirrored", "--output", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"kvlm train: error: Strategy 'mirrored' is supported for the vqa task only; the {task} task" in error
    assert "--strategy auto or one_device" in error
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="vqa task only"):
        fit(TrainConfig(output=str(tmp_path / "run"), task=task), strategy="data_parallel")


def test_bad_task_options_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="`task` must be one of vqa, retrieval, captioning, distillation, rag"):
        fit(TrainConfig(output=str(tmp_path), task="detection"))
    with pytest.raises(ValueError, match="`loss` must be one of"):
        fit(TrainConfig(output=str(tmp_path), task="retrieval", task_options={"loss": "triplet"}))
    with pytest.raises(ValueError, match="The vqa task has no option.*'loss'"):
        fit(TrainConfig(output=str(tmp_path), task="vqa", task_options={"loss": "clip"}))
    with pytest.raises(ValueError, match="drop `--moe-experts`"):
        fit(TrainConfig(output=str(tmp_path), task="retrieval", overrides={"moe": {"experts": 4, "top_k": 2}}))
    assert not any(tmp_path.iterdir())


def test_help_lists_the_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--task vqa|retrieval|captioning" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{vqa,retrieval,captioning,distillation,rag,domain_expert}" in text and "{clip,siglip}" in text
    assert "vqa: image+question -> answer; retrieval: CLIP/SigLIP dual encoder; captioning: image -> caption" in text
