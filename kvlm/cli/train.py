"""`kvlm train` and `kvlm evaluate`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Kept in sync with kvlm.training.distribution.ALL_STRATEGIES (not imported: it loads Keras).
STRATEGY_CHOICES = ("auto", "one_device", "mirrored", "multi_worker", "data_parallel", "expert_parallel")


def _backup_freq(value: str):
    if value == "epoch":
        return value
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(f"expected 'epoch' or a number of steps >= 1, got {value!r}")
    return steps


def _dataset_names(value: str) -> list[str]:
    from kvlm.experts import datasets  # plugin discovery only: Keras is not loaded

    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated dataset names, got {value!r}")
    available = datasets()
    unknown = [name for name in names if name not in available]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dataset(s) {', '.join(unknown)}; available: {', '.join(sorted(available)) or 'none'}"
        )
    return names


def _moe_experts(value: str) -> int | str | list[str]:
    """`8` (built-in experts), `installed`, or `medical,legal` (named plugin experts)."""
    if value.isdigit():
        if int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1 expert, got {value!r}")
        return int(value)
    if value == "installed":
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a number, 'installed' or expert names, got {value!r}")
    return names


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
    train.add_argument(
        "--datasets", type=_dataset_names, default=None,
        help="comma-separated plugin datasets to mix in equal shares, e.g. "
        "medical_scans,legal_documents,retail_shelves (see `kvlm experts list`)",
    )
    train.add_argument("--train-size", type=int, default=24000, help="procedural training examples")
    train.add_argument("--eval-size", type=int, default=2000, help="procedural held-out examples")
    train.add_argument("--epochs", type=int, default=8)
    train.add_argument("--batch-size", type=int, default=64, help="global batch, split over replicas")
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--augment", action="store_true", help="tf-models-official RandAugment")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--strategy", default="auto", choices=STRATEGY_CHOICES,
        help="tensorflow: one_device|mirrored|multi_worker (cluster from TF_CONFIG); "
        "jax: data_parallel|expert_parallel (processes from KERAS_DISTRIBUTION_*); auto picks from the environment",
    )
    train.add_argument("--moe-experts", type=_moe_experts, default=None,
                       help="put a SparseMoE in every other fusion block: N built-in FFN experts, "
                       "'installed' (every plugin expert) or comma-separated expert names (`kvlm experts list`)")
    train.add_argument("--moe-top-k", type=int, default=2, help="experts per token (with --moe-experts)")
    train.add_argument("--expert-axis-size", type=int, default=None, help="expert_parallel: devices on the expert axis")
    train.add_argument(
        "--backup-freq", type=_backup_freq, default="epoch",
        help="BackupAndRestore every N steps or 'epoch'; a restarted run resumes from the last backup",
    )
    train.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="TensorBoard logs in OUTPUT/logs")
    train.add_argument("--cpu-devices", type=int, default=None,
                       help="split the CPU into N devices (to try mirrored/data_parallel without GPUs)")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser("evaluate", help="evaluate a trained run on held-out data")
    evaluate.add_argument("--model", default="runs/vqa", help="run folder written by `kvlm train`")
    evaluate.add_argument("--data-dir", default=None, help="evaluate on this folder instead")
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    evaluate.set_defaults(handler=run_evaluate)


def run_train(args) -> int:
    if args.cpu_devices:
        # Before Keras (and so JAX) starts; TensorFlow is split below.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    import keras

    from kvlm.training import NonFiniteLossError, TrainConfig, fit, make_distribution
    from kvlm.training.distribution import configure_cpu_devices

    if args.cpu_devices and keras.backend.backend() == "tensorflow":
        configure_cpu_devices(args.cpu_devices)
    distribution = make_distribution(args.strategy, expert_axis_size=args.expert_axis_size)
    config = TrainConfig(
        output=args.output, preset=args.preset, encoder=args.encoder, data_dir=args.data_dir,
        train_size=args.train_size, eval_size=args.eval_size, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, augment=args.augment, seed=args.seed,
        overrides={"moe": {"experts": args.moe_experts, "top_k": args.moe_top_k}} if args.moe_experts else {},
        datasets=args.datasets,
    )
    try:
        summary = fit(
            config, strategy=distribution, checkpoint=True, backup_freq=args.backup_freq,
            tensorboard=args.tensorboard,
        )
    except NonFiniteLossError as error:
        print(f"kvlm train: {error}", file=sys.stderr)
        return 1
    out = Path(summary["output"])
    metrics = summary["metrics"]
    resumed = f" (resumed at step {summary['resumed_from_step']})" if summary["resumed_from_step"] else ""
    print(
        f"trained {summary['train_examples']} examples with strategy {summary['strategy']} "
        f"({summary['replicas']} replicas, {summary['workers']} workers) in {summary['train_seconds']:.0f}s{resumed}; "
        f"held-out accuracy {metrics['accuracy']:.4f} on {summary['eval_examples']} examples "
        f"({summary['num_classes']} answers); saved to {out / 'model.keras'}; "
        f"curves in {out / 'training_curves.png'}"
    )
    if "routing" in summary:
        from kvlm.training.routing import RoutingReport, format_routing_report

        print(format_routing_report(RoutingReport.from_dict(summary["routing"])))
        print(f"routing: {out / 'routing.json'}, heatmap {out / 'routing.png'}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def run_evaluate(args) -> int:
    from kvlm.training import evaluate, format_report

    report = evaluate(args.model, data_dir=args.data_dir)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
