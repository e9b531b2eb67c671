"""Evaluation reports, training curves and the `kvlm train` / `kvlm evaluate` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvlm.training import classification_report, format_report
from kvlm.training.callbacks import TrainingCurves, plot_history, read_history_csv
from kvlm.training.reports import classification_metrics


def test_metrics_on_a_hand_checked_example():
    # class 0: TP 1 of 2 predicted, 2 true -> P 1/2, R 1/2, F1 1/2
    # class 1: TP 2 of 3 predicted, 2 true -> P 2/3, R 1,   F1 4/5
    # class 2: TP 1 of 1 predicted, 2 true -> P 1,   R 1/2, F1 2/3
    metrics = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_classes_only_predicted_or_only_true_count_as_zero():
    # class 1 is never true (precision 0) and class 2 never predicted (recall 0).
    metrics = classification_metrics([0, 0, 2], [0, 1, 0])
    assert metrics["macro_precision"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert metrics["macro_recall"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 0 + 0) / 3)


def test_matches_scikit_learn_on_random_labels():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 7, 500), rng.integers(0, 9, 500)
    ours = classification_metrics(y_true, y_pred)
    precision, recall, f1, _ = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    assert (ours["macro_precision"], ours["macro_recall"], ours["macro_f1"]) == pytest.approx((precision, recall, f1))


def test_per_domain_table():
    report = classification_report([0, 1, 1, 0, 2], [0, 1, 0, 0, 2], ["medical", "legal", "legal", "medical", "medical"])
    assert report["examples"] == 5 and report["accuracy"] == pytest.approx(0.8)
    assert report["per_domain"]["medical"] == pytest.approx(
        {"accuracy": 1.0, "macro_precision": 1.0, "macro_recall": 1.0, "macro_f1": 1.0, "examples": 3}
    )
    legal = report["per_domain"]["legal"]  # true [1, 1], predicted [1, 0]
    assert (legal["examples"], legal["accuracy"], legal["macro_recall"]) == (2, 0.5, pytest.approx(0.25))
    text = format_report(report)
    assert "macro_f1" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("legal", "medical"))]
    assert [row[:3] for row in rows] == [["legal", "2", "0.5000"], ["medical", "3", "1.0000"]]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        classification_metrics([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="zero examples"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="`domains` has 1 entries for 2 examples"):
        classification_report([0, 1], [0, 1], ["a"])


def test_training_curves_png(tmp_path):
    csv = tmp_path / "history.csv"
    csv.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,2.0,0.4,2.2\n")
    curves = TrainingCurves(tmp_path / "training_curves.png", read_history_csv(csv))
    curves.on_epoch_end(1, {"accuracy": 0.7, "loss": 1.0, "val_accuracy": 0.6, "val_loss": 1.4})
    assert curves.history["loss"] == [2.0, 1.0] and curves.history["val_accuracy"] == [0.4, 0.6]
    image = (tmp_path / "training_curves.png").read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")
    assert (width, height) == (1000, 400)  # two panels (loss, accuracy) of 5 x 4 inches at 100 dpi
    plot_history({"loss": [1.0]}, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 1000


@pytest.mark.tensorflow_only
def test_cli_train_writes_the_run_folder_and_evaluate_prints_the_report(tmp_path, capsys):
    from kvlm.cli import main

    out = tmp_path / "run"
    code = main([
        "train", "--output", str(out), "--train-size", "128", "--eval-size", "40", "--epochs", "2",
        "--batch-size", "32", "--backup-freq", "3",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "with strategy default" in printed and "training_curves.png" in printed
    for name in ("model.keras", "checkpoint.keras", "history.csv", "training_curves.png", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    assert not (out / "backup").exists()  # BackupAndRestore cleans up after a finished run
    assert len(read_history_csv(out / "history.csv")["loss"]) == 2
    summary = json.loads((out / "summary.json").read_text())

    assert main(["evaluate", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "domain", "shapes"):
        assert word in text
    assert main(["evaluate", "--model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 40 and report["per_domain"]["shapes"]["examples"] == 40
    # The numpy report agrees with Keras' own metrics on the same held-out split.
    assert report["accuracy"] == pytest.approx(summary["metrics"]["accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(summary["metrics"]["loss"], rel=1e-4)
    assert report["per_domain"]["shapes"]["macro_f1"] == pytest.approx(report["macro_f1"])


def test_cli_rejects_bad_backup_frequency(capsys):
    from kvlm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--backup-freq", "0"])
    assert "expected 'epoch' or a number of steps >= 1" in capsys.readouterr().err


def test_evaluate_needs_a_trained_run(tmp_path):
    from kvlm.training import evaluate

    with pytest.raises(FileNotFoundError, match="No model.keras"):
        evaluate(tmp_path)
