"""`kvlm train --task rag`, `kvlm evaluate` / `kvlm export` of its run, `kvlm index build|attach` on it."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kvlm.cli import main
from kvlm.data import catalogue
from kvlm.runs import MODEL_FILE, TrainConfig, load_run, write_run_files
from kvlm.training import evaluate, fit

# Product catalogues, kvlm_tiny with the CNN encoder: about 85 s on a 2-core CPU. The retriever
# needs its 6 epochs (144 steps): with fewer, recall@3 stays near 0.7 and the reader near 0.37.
RAG = ["--train-size", "1536", "--eval-size", "200", "--epochs", "4", "--retriever-epochs", "6",
       "--train-catalogues", "60"]
RUN_FILES = ("model.keras", "checkpoint.keras", "vocabulary.txt", "answers.txt", "run.json", "history.csv",
             "training_curves.png", "summary.json", "rag.json", "index/index.json", "index/embeddings.npy")
# Chance (guessing a value of the asked field) is 0.195 here. Held-out accuracy on unseen stores
# and on the index store must beat it by this much (measured: 0.545 and 0.580, retriever recall@1
# 0.43 and recall@3 0.97).
ACCURACY_MARGIN = 0.15
# The same model with another store's catalogue attached answers that store about as well.
ATTACHED_TOLERANCE = 0.12


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("trains on the TensorFlow backend only (slow elsewhere)")
    out = tmp_path_factory.mktemp("rag") / "run"
    assert main(["train", "--task", "rag", "--output", str(out), "--no-tensorboard", *RAG]) == 0
    return out


def _inputs(model, tokenizer, examples):
    images = np.stack([e.image for e in examples]).astype("float32") / 255.0
    return {"images": images, "token_ids": np.asarray(tokenizer([e.question for e in examples]))}


def _answers(model, tokenizer, examples) -> list[str]:
    logits = model.predict(_inputs(model, tokenizer, examples), verbose=0)
    return [catalogue.ANSWERS[i] for i in np.asarray(logits).argmax(-1)]


def _accuracy(answers, examples) -> float:
    return float(np.mean([a == e.answer for a, e in zip(answers, examples)]))


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_rag_run_folder_report_and_evaluate(rag_run, capsys):
    from kvlm.models import KnowledgeIndex, RetrievalAugmentedVLM

    for name in RUN_FILES:
        assert (rag_run / name).is_file(), name
    assert not (rag_run / "backup").exists() and not (rag_run / "retriever.keras").exists()
    config = json.loads((rag_run / "run.json").read_text())
    assert config["task"] == "rag"
    assert config["task_options"] == {
        "top_k": 3, "train_catalogues": 60, "retriever_epochs": 6, "index_store": 10000, "index_dir": None,
    }
    assert (rag_run / "answers.txt").read_text().split() == list(catalogue.ANSWERS)

    report = json.loads((rag_run / "rag.json").read_text())
    chance = report["chance"]
    assert 0.17 < chance < 0.21 and report["held_out_examples"] == 200
    assert report["held_out_accuracy"] > chance + ACCURACY_MARGIN, report
    assert report["index_store"]["store"] == 10000 and report["index_store"]["examples"] == 200
    assert report["index_store"]["in_graph_accuracy"] > chance + ACCURACY_MARGIN, report
    retriever = report["retriever"]
    assert retriever["epochs"] == 6 and 1 / 24 < retriever["recall@1"] <= retriever["recall@3"] <= 1.0

    # The saved model holds the index store's catalogue, as index/ does.
    run = load_run(rag_run)
    model = run.model
    assert isinstance(model, RetrievalAugmentedVLM) and run.answers == list(catalogue.ANSWERS)
    assert run.config.task == "rag" and model.index_size == 24
    index = KnowledgeIndex.load(rag_run / "index")
    assert index.texts == catalogue.catalogue(10000) and index.metadata["catalogue"] == 10000
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.index_embeddings), index.embeddings, atol=1e-6)

    # `kvlm evaluate`: fresh examples of the index store, in-graph retrieval; the figure of rag.json.
    evaluated = evaluate(rag_run)
    assert evaluated["examples"] == 200 and evaluated["index_store"] == 10000
    assert evaluated["accuracy"] == pytest.approx(report["index_store"]["in_graph_accuracy"], abs=1e-6)
    assert main(["evaluate", "--model", str(rag_run)]) == 0
    printed = capsys.readouterr().out
    assert "catalogue of store 10000" in printed and "accuracy" in printed


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_exported_rag_run_answers_png_bytes_like_the_keras_model(rag_run, tmp_path, capsys):
    import tensorflow as tf

    from kvlm.data import png_bytes

    assert main(["export", "--model", str(rag_run), "--base-path", str(tmp_path), "--name", "rag"]) == 0
    assert "exported rag run" in capsys.readouterr().out
    run = load_run(rag_run)
    model, tokenizer = run.model, run.tokenizer
    examples = catalogue.generate(32, seed=5, catalogue_seeds=[10000])
    serve = tf.saved_model.load(str(tmp_path / "rag" / "1")).signatures["serving_default"]
    outputs = serve(image_bytes=tf.constant([png_bytes(e) for e in examples]),
                    text=tf.constant([e.question for e in examples]))
    assert [a.decode() for a in outputs["answer"].numpy()] == _answers(model, tokenizer, examples)


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_another_catalogue_is_attached_without_retraining(rag_run, tmp_path, capsys):
    from kvlm.models import KnowledgeIndex

    index_dir, new_run = tmp_path / "store-10001", tmp_path / "run-10001"
    assert main(["index", "build", "--model", str(rag_run), "--catalogue", "10001", "--output", str(index_dir)]) == 0
    assert "indexed 24 entries" in capsys.readouterr().out
    assert KnowledgeIndex.load(index_dir).metadata["catalogue"] == 10001
    assert main(["index", "attach", "--model", str(rag_run), "--index", str(index_dir), "--output", str(new_run)]) == 0
    assert "the catalogue of store 10001" in capsys.readouterr().out

    config = json.loads((new_run / "run.json").read_text())
    options = config["task_options"]
    assert (config["task"], options["index_store"], options["index_dir"]) == ("rag", 10001, str(index_dir.resolve()))
    assert KnowledgeIndex.load(new_run / "index").texts == catalogue.catalogue(10001)
    assert not (new_run / "checkpoint.keras").exists() and (new_run / "rag.json").is_file()

    original = json.loads((rag_run / "rag.json").read_text())["index_store"]["in_graph_accuracy"]  # = evaluate(rag_run)
    attached = evaluate(new_run)
    assert attached["index_store"] == 10001 and attached["examples"] == 200
    assert abs(attached["accuracy"] - original) < ATTACHED_TOLERANCE, (attached["accuracy"], original)
    # The catalogue is what answers: on the same examples of store 10001 (evaluate's: seed 0 + 2),
    # the original model, reading store 10000's prices and aisles, is near chance.
    run = load_run(rag_run)
    model, tokenizer = run.model, run.tokenizer
    examples = catalogue.generate(200, seed=2, catalogue_seeds=[10001])
    wrong = _accuracy(_answers(model, tokenizer, examples), examples)
    assert attached["accuracy"] > wrong + 0.15, (attached["accuracy"], wrong)

    # A plain-text index (not a catalogue) attaches too; `kvlm evaluate` then needs --data-dir.
    entries = tmp_path / "entries.txt"
    entries.write_text("\n".join(catalogue.catalogue(10002)) + "\n")
    assert main(["index", "build", "--model", str(rag_run), "--entries", str(entries), "--output", str(tmp_path / "p")]) == 0
    assert main(["index", "attach", "--model", str(rag_run), "--index", str(tmp_path / "p"),
                 "--output", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["task_options"]["index_store"] is None
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "plain")]) == 2
    assert "is not a product catalogue" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_attach_errors_name_the_problem(rag_run, tmp_path, capsys):
    from kvlm.data import build_vocabulary
    from kvlm.models import DualEncoder, KnowledgeIndex

    # A retrieval run (untrained) and indexes it built: 64-d like the rag retriever, and 32-d.
    vocabulary = build_vocabulary(catalogue.vocabulary_texts(range(3)), 200)
    retrieval = tmp_path / "retrieval"
    retrieval.mkdir()
    DualEncoder.from_preset("kvlm_tiny", vocabulary_size=len(vocabulary), encoder="cnn").save(retrieval / MODEL_FILE)
    write_run_files(retrieval, TrainConfig(output=str(retrieval), task="retrieval"), vocabulary, None)
    assert main(["index", "build", "--model", str(retrieval), "--catalogue", "3", "--output", str(tmp_path / "other")]) == 0
    narrow = KnowledgeIndex(catalogue.catalogue(3), np.eye(24, 32, dtype="float32"), catalogue.keys())
    narrow.save(tmp_path / "narrow")
    ok = tmp_path / "ok"
    assert main(["index", "build", "--model", str(rag_run), "--catalogue", "3", "--output", str(ok)]) == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    capsys.readouterr()

    cases = [
        (retrieval, ok, "new", "is a retrieval run"),
        (rag_run, tmp_path / "narrow", "new", "32-d embeddings and the retriever"),
        (rag_run, tmp_path / "other", "new", "embedded by another dual encoder"),
        (rag_run, ok, "taken", "already exists and is not an empty folder"),
        (rag_run, tmp_path / "missing", "new", "kvlm index build"),
    ]
    for model, index, output, message in cases:
        argv = ["index", "attach", "--model", str(model), "--index", str(index), "--output", str(tmp_path / output)]
        assert main(argv) == 2, message
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "new").exists()


def test_rag_options_name_the_problem(tmp_path, capsys):
    for flag, value in (("--data-dir", str(tmp_path)), ("--datasets", "medical_scans")):
        if flag == "--datasets":
            from kvlm.experts import datasets

            if "medical_scans" not in datasets():
                continue
        assert main(["train", "--task", "rag", flag, value, "--output", str(tmp_path / "run")]) == 2
        error = capsys.readouterr().err
        assert "kvlm train: error: The rag task trains on the product-catalogue task" in error and f"drop {flag}" in error
    assert main(["train", "--task", "rag", "--strategy", "mirrored", "--output", str(tmp_path / "run")]) == 2
    assert "the rag task trains on one device" in capsys.readouterr().err
    for options, message in (
        (dict(data_dir=str(tmp_path)), "drop --data-dir"),
        (dict(task_options={"top_k": 25}), "`top_k` must be between 1 and the 24"),
        (dict(task_options={"train_catalogues": 0}), "`train_catalogues` must be between 1"),
        (dict(task_options={"retriever_epochs": 0}), "`retriever_epochs` must be >= 1"),
        (dict(task_options={"index_store": None}), "`index_store` must be a store seed"),
        (dict(task_options={"teacher": "runs/vqa"}), "The rag task has no option.*'teacher'"),
    ):
        with pytest.raises(ValueError, match=message):
            fit(TrainConfig(output=str(tmp_path / "run"), task="rag", **options))
    assert main(["train", "--task", "rag", "--alpha", "0.5", "--output", str(tmp_path / "run")]) == 2
    assert "--alpha: not an option of the rag task" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "rag: answers from a knowledge base (product catalogues) by retrieval" in text
    for option in ("--top-k", "--train-catalogues", "--retriever-epochs", "--index-store"):
        assert option in text, option
