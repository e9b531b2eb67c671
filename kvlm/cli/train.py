"""`kvlm train` and `kvlm evaluate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    """Adds the `train` and `evaluate` commands."""
    train = subparsers.add_parser(
        "train",
        help="train a VQA classifier (procedural shapes data or a folder with annotations.jsonl)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--output", default="runs/vqa", help="run folder for model, vocabulary and logs")
    train.add_argument("--preset", default="kvlm_tiny", choices=["kvlm_tiny", "kvlm_small", "kvlm_base"])
    train.add_argument("--encoder", default="cnn", choices=["vit", "cnn"])
    train.add_argument("--data-dir", default=None, help="folder with images and annotations.jsonl")
    train.add_argument("--train-size", type=int, default=24000, help="procedural training examples")
    train.add_argument("--eval-size", type=int, default=2000, help="procedural held-out examples")
    train.add_argument("--epochs", type=int, default=8)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--augment", action="store_true", help="tf-models-official RandAugment")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser("evaluate", help="evaluate a trained run on held-out data")
    evaluate.add_argument("--model", default="runs/vqa", help="run folder written by `kvlm train`")
    evaluate.add_argument("--data-dir", default=None, help="evaluate on this folder instead")
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    evaluate.set_defaults(handler=run_evaluate)


def run_train(args) -> int:
    import keras

    from kvlm.training import TrainConfig, train

    config = TrainConfig(
        output=args.output, preset=args.preset, encoder=args.encoder, data_dir=args.data_dir,
        train_size=args.train_size, eval_size=args.eval_size, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, augment=args.augment, seed=args.seed,
    )
    out = Path(args.output)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(out / "backup")),
        keras.callbacks.CSVLogger(str(out / "history.csv")),
        keras.callbacks.TensorBoard(str(out / "logs")),
    ]
    summary = train(config, callbacks=callbacks)
    metrics = summary["metrics"]
    print(
        f"trained {summary['train_examples']} examples in {summary['train_seconds']:.0f}s; "
        f"held-out accuracy {metrics['accuracy']:.4f} on {summary['eval_examples']} examples "
        f"({summary['num_classes']} answers); saved to {out / 'model.keras'}"
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def run_evaluate(args) -> int:
    from kvlm.training import evaluate

    metrics = evaluate(args.model, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name:>10}: {value:.4f}" if isinstance(value, float) else f"{name:>10}: {value}")
    return 0
