"""`kvlm train --task distillation` on a tiny MoE VQA teacher, then `kvlm evaluate` and `kvlm export` on the student."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kvlm.cli import main
from kvlm.runs import TrainConfig, load_run
from kvlm.training import fit

pytestmark = pytest.mark.long

# Procedural shapes, kvlm_tiny with the CNN encoder: the teacher has a 4-expert top-2 SparseMoE
# (so its active parameters are fewer than its total); about 30 s per run on a 2-core CPU.
TEACHER = ["--train-size", "256", "--eval-size", "64", "--epochs", "1", "--batch-size", "32",
           "--moe-experts", "4", "--moe-top-k", "2"]
STUDENT = ["--epochs", "2", "--batch-size", "32", "--alpha", "0.5", "--temperature", "2"]
# Held-out accuracy of teacher and student above the most frequent answer's share.
ACCURACY_MARGIN = 0.05
RUN_FILES = ("model.keras", "checkpoint.keras", "vocabulary.txt", "answers.txt", "run.json", "history.csv",
             "training_curves.png", "summary.json", "distillation.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("trains on the TensorFlow backend only (slow elsewhere)")
    root = tmp_path_factory.mktemp("distillation")
    teacher, student = root / "teacher", root / "student"
    assert main(["train", "--output", str(teacher), "--no-tensorboard", *TEACHER]) == 0
    assert main([
        "train", "--task", "distillation", "--teacher", str(teacher), "--output", str(student), "--no-tensorboard",
        *STUDENT,
    ]) == 0
    return teacher, student


@pytest.mark.tensorflow_only
def test_distillation_run_folder_and_figures(runs):
    from kvlm.data import encode_answers, make_dataset
    from kvlm.models import VLMClassifier
    from kvlm.models.flops import model_profile
    from kvlm.training import load_examples

    teacher_dir, student_dir = runs
    for name in RUN_FILES:
        assert (student_dir / name).is_file(), name
    assert not (student_dir / "backup").exists()
    config = json.loads((student_dir / "run.json").read_text())
    assert config["task"] == "distillation" and config["preset"] == "kvlm_tiny"
    assert config["task_options"] == {"teacher": str(teacher_dir.resolve()), "alpha": 0.5, "temperature": 2.0}
    assert config["overrides"] == {"num_fusion_layers": 1}
    # The teacher's data, vocabulary and answers.
    teacher_config = json.loads((teacher_dir / "run.json").read_text())
    for name in ("train_size", "eval_size", "seed", "data_dir", "datasets", "vocabulary_size"):
        assert config[name] == teacher_config[name], name
    for name in ("vocabulary.txt", "answers.txt"):
        assert (student_dir / name).read_text() == (teacher_dir / name).read_text(), name

    student_run, teacher_run = load_run(student_dir), load_run(teacher_dir)
    student, teacher, tokenizer, answers = student_run.model, teacher_run.model, student_run.tokenizer, student_run.answers
    assert isinstance(student, VLMClassifier) and student_run.config.task == "distillation"
    assert answers == teacher_run.answers and student.num_classes == len(answers)
    assert tokenizer.sequence_length == student.backbone.sequence_length == teacher.backbone.sequence_length
    assert (student.backbone.num_fusion_layers, teacher.backbone.num_fusion_layers) == (1, 3)
    assert model_profile(student)["moe_layers"] == 0 and model_profile(teacher)["moe_layers"] > 0

    report = json.loads((student_dir / "distillation.json").read_text())
    student_accuracy, teacher_accuracy = report["student"]["accuracy"], report["teacher"]["accuracy"]
    # Both accuracies are those of the saved models on the teacher's held-out split, recomputed here.
    held_out = load_examples(teacher_run.config)[1]
    data = make_dataset(held_out, tokenizer, answers, student.backbone.image_size, 64)
    labels = encode_answers(held_out, answers)
    for model, accuracy in ((student, student_accuracy), (teacher, teacher_accuracy)):
        assert accuracy == pytest.approx(np.mean(model.predict(data, verbose=0).argmax(-1) == labels), abs=1e-6)
    # Above the best constant answer by a margin (measured: student 0.31, teacher 0.30, constant 0.17).
    constant = max(np.mean(labels == label) for label in range(len(answers)))
    assert min(student_accuracy, teacher_accuracy) > constant + ACCURACY_MARGIN, (report, constant)
    ratios = report["ratios"]
    assert ratios["accuracy"] == pytest.approx(student_accuracy / teacher_accuracy)
    for name in ("parameters", "active_parameters", "flops"):
        assert 0.0 < ratios[name] <= 1.0, (name, ratios)
    assert report["teacher"]["parameters"]["active"] < report["teacher"]["parameters"]["total"]
    assert report["student"]["parameters"] == model_profile(student)["parameters"]
    assert report["teacher"]["flops"] == model_profile(teacher)["flops"]
    assert (report["alpha"], report["temperature"], report["eval_examples"]) == (0.5, 2.0, 64)
    summary = json.loads((student_dir / "summary.json").read_text())
    assert summary["task"] == "distillation" and summary["distillation"] == report
    assert summary["metrics"]["accuracy"] == pytest.approx(student_accuracy, abs=1e-6)

    # The teacher's held-out accuracy is the one `kvlm evaluate` gives the teacher run (the same split).
    from kvlm.training import evaluate

    assert evaluate(teacher_dir)["accuracy"] == pytest.approx(teacher_accuracy, abs=1e-6)


@pytest.mark.tensorflow_only
def test_evaluate_and_export_the_student(runs, tmp_path, capsys):
    import tensorflow as tf

    from kvlm.data import make_dataset, png_bytes, shapes
    from kvlm.training import evaluate

    _, student_dir = runs
    report = json.loads((student_dir / "distillation.json").read_text())
    evaluated = evaluate(student_dir)
    assert "task" not in evaluated and evaluated["examples"] == 64
    assert evaluated["accuracy"] == pytest.approx(report["student"]["accuracy"], abs=1e-6)
    assert main(["evaluate", "--model", str(student_dir)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "macro_f1" in text and "shapes" in text

    assert main(["export", "--model", str(student_dir), "--base-path", str(tmp_path), "--name", "student"]) == 0
    assert "exported distillation run" in capsys.readouterr().out
    loaded = tf.saved_model.load(str(tmp_path / "student" / "1"))
    run = load_run(student_dir)
    student, tokenizer, answers = run.model, run.tokenizer, run.answers
    examples = shapes.generate(4, seed=77)
    outputs = loaded.signatures["serving_default"](
        image_bytes=tf.constant([png_bytes(e) for e in examples]), text=tf.constant([e.question for e in examples])
    )
    served = [a.decode() for a in outputs["answer"].numpy()]
    assert all(answer in answers for answer in served)
    # PNG is lossless: the served answers are the student's for the same images and questions.
    logits = student.predict(make_dataset(examples, tokenizer, answers, student.backbone.image_size, 4), verbose=0)
    assert served == [answers[i] for i in np.argmax(logits, axis=-1)]


def _fake_run(path, task: str):
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"task": task, "output": str(path)}))
    (path / "model.keras").write_bytes(b"")
    return path


def test_distillation_needs_a_vqa_teacher(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["train", "--task", "distillation", "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert "kvlm train: error: The distillation task needs a trained vqa run as its teacher: pass --teacher" in error

    retrieval = _fake_run(tmp_path / "retrieval", "retrieval")
    assert main(["train", "--task", "distillation", "--teacher", str(retrieval), "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"kvlm train: error: Teacher {retrieval} is a retrieval run" in error and "vqa" in error

    assert main(["train", "--task", "distillation", "--teacher", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert "is not a trained run folder (no run.json or model.keras)" in capsys.readouterr().err

    vqa = _fake_run(tmp_path / "vqa", "vqa")
    assert main(["train", "--task", "distillation", "--teacher", str(vqa), "--output", str(out)]) == 2
    assert f"Teacher {vqa} has no answers.txt" in capsys.readouterr().err
    (vqa / "answers.txt").write_text("yes\nno\n")
    assert main(["train", "--task", "distillation", "--teacher", str(vqa), "--moe-experts", "4",
                 "--output", str(out)]) == 2
    assert "student is a dense VLMClassifier: drop `--moe-experts`" in capsys.readouterr().err
    assert main(["train", "--task", "distillation", "--teacher", str(vqa), "--train-size", "64",
                 "--data-dir", str(tmp_path), "--output", str(out)]) == 2
    assert "teacher run's data and sizes: drop --data-dir and --train-size" in capsys.readouterr().err
    assert main(["train", "--task", "distillation", "--teacher", str(vqa), "--strategy", "mirrored",
                 "--output", str(out)]) == 2
    assert "the distillation task trains on one device" in capsys.readouterr().err
    assert not out.exists()

    with pytest.raises(ValueError, match="`alpha` must be in"):
        fit(TrainConfig(output=str(out), task="distillation", task_options={"teacher": str(vqa), "alpha": 1.5}))
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        fit(TrainConfig(output=str(out), task="distillation", task_options={"teacher": str(vqa), "temperature": 0.0}))
    with pytest.raises(ValueError, match="teacher run's data and sizes: drop --train-size"):
        fit(TrainConfig(output=str(out), task="distillation", train_size=64, task_options={"teacher": str(vqa)}))
    with pytest.raises(ValueError, match="needs a trained vqa run"):
        fit(TrainConfig(output=str(out), task="distillation"))
    assert not out.exists()


def test_help_and_defaults(capsys):
    from kvlm.models import distiller

    options = TrainConfig(task="distillation").options
    assert (options["alpha"], options["temperature"]) == (distiller.DEFAULT_ALPHA, distiller.DEFAULT_TEMPERATURE)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "distillation: a small dense student from a trained VQA teacher (--teacher)" in text
    for option in ("--teacher", "--student-preset", "--student-fusion-layers", "--alpha", "--temperature"):
        assert option in text, option

