"""`kvlm train` and `kvlm evaluate`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Kept in sync with kvlm.training.distribution.ALL_STRATEGIES (not imported: it loads Keras).
STRATEGY_CHOICES = ("auto", "one_device", "mirrored", "multi_worker", "data_parallel", "expert_parallel")
# Kept in sync with kvlm.training.tasks.TASKS, TASK_HELP and TASK_DEFAULTS (not imported: it loads Keras).
TASK_CHOICES = ("vqa", "retrieval", "captioning", "distillation", "rag")
TASK_HELP = (
    "vqa: image+question -> answer; retrieval: CLIP/SigLIP dual encoder; captioning: image -> caption; "
    "distillation: a small dense student from a trained VQA teacher (--teacher); "
    "rag: answers from a knowledge base (product catalogues) by retrieval"
)
# Kept in sync with kvlm.models.distiller.DEFAULT_ALPHA and DEFAULT_TEMPERATURE.
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 3.0
# Options that describe the data: a distillation run takes them from its teacher run.
TEACHER_DATA_OPTIONS = ("data_dir", "datasets", "train_size", "eval_size")
# Options the rag task cannot take: it trains on the product-catalogue task.
RAG_REFUSED_OPTIONS = ("data_dir", "datasets")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help text already explains a task-dependent default."""

    def _get_help_string(self, action):
        if action.default is None and "per task" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


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
        help="train a VQA classifier, a retrieval dual encoder, a captioner, a distilled VQA student or a "
        "retrieval-augmented model on product catalogues (--task "
        f"{'|'.join(TASK_CHOICES)}; procedural shapes data or a folder with annotations.jsonl)",
        formatter_class=_HelpFormatter,
    )
    train.add_argument("--task", default="vqa", choices=TASK_CHOICES, help=TASK_HELP)
    train.add_argument(
        "--loss", default="clip", choices=("clip", "siglip"),
        help="retrieval: contrastive loss (CLIP softmax or SigLIP sigmoid)",
    )
    train.add_argument("--teacher", default=None,
                       help="distillation: the teacher's run folder (a `kvlm train --task vqa` run); the student "
                       "trains on its data, sizes, seed, vocabulary and answers")
    train.add_argument("--student-preset", default="kvlm_tiny", choices=["kvlm_tiny", "kvlm_small", "kvlm_base"],
                       help="distillation: the dense student's preset (with the teacher's image size and sequence length)")
    train.add_argument("--student-fusion-layers", type=_positive_int, default=1,
                       help="distillation: fusion blocks of the student")
    train.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                       help="distillation: weight of the label cross-entropy; the soft-target KL gets 1 - alpha")
    train.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help="distillation: softmax temperature of the soft targets")
    train.add_argument("--top-k", type=_positive_int, default=3,
                       help="rag: catalogue entries the reader reads per answer")
    train.add_argument("--train-catalogues", type=_positive_int, default=500,
                       help="rag: stores (catalogue seeds 0..N-1) the training examples come from")
    train.add_argument("--retriever-epochs", type=_positive_int, default=3,
                       help="rag: training epochs of the CLIP retriever (before the reader's --epochs)")
    train.add_argument("--index-store", type=int, default=10000,
                       help="rag: the store whose catalogue goes into the saved model's index "
                       "(10000-10049 are the held-out stores)")
    train.add_argument("--output", default=None, help="run folder for model, vocabulary and logs (default per task: runs/TASK)")
    train.add_argument("--preset", default="kvlm_tiny", choices=["kvlm_tiny", "kvlm_small", "kvlm_base"],
                       help="model preset (distillation: see --student-preset)")
    train.add_argument("--encoder", default="cnn", choices=["vit", "cnn"], help="image encoder (distillation: the student's)")
    train.add_argument("--data-dir", default=None, help="folder with images and annotations.jsonl")
    train.add_argument(
        "--datasets", type=_dataset_names, default=None,
        help="comma-separated plugin datasets to mix in equal shares, e.g. "
        "medical_scans,legal_documents,retail_shelves (see `kvlm experts list`)",
    )
    train.add_argument("--train-size", type=int, default=None,
                       help="procedural training examples (default per task: vqa 24000, retrieval 4096, captioning 3072, rag 12000; distillation: the teacher's)")
    train.add_argument("--eval-size", type=int, default=None,
                       help="procedural held-out examples (default per task: vqa 2000, retrieval and captioning 512, rag 1000; distillation: the teacher's)")
    train.add_argument("--epochs", type=int, default=None,
                       help="training epochs (default per task: vqa, distillation and rag 8, retrieval 10, captioning 4)")
    train.add_argument("--batch-size", type=int, default=None,
                       help="global batch, split over replicas (default per task: vqa, retrieval, distillation and rag 64, captioning 32)")
    train.add_argument("--learning-rate", type=float, default=None,
                       help="peak AdamW learning rate (default per task: vqa, captioning and distillation 2e-3, retrieval and rag 1e-3)")
    train.add_argument("--augment", action="store_true", help="tf-models-official RandAugment")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--strategy", default="auto", choices=STRATEGY_CHOICES,
        help="tensorflow: one_device|mirrored|multi_worker (cluster from TF_CONFIG); "
        "jax: data_parallel|expert_parallel (processes from KERAS_DISTRIBUTION_*); auto picks from the environment. "
        "The retrieval, captioning, distillation and rag tasks train on one device: auto or one_device",
    )
    train.add_argument("--moe-experts", type=_moe_experts, default=None,
                       help="put a SparseMoE in every other fusion block (captioning: after every decoder layer; "
                       "not for retrieval or the distillation student): N built-in FFN experts, "
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

    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run on held-out data (vqa and distillation: accuracy, macro P/R/F1; "
        "rag: the same, with in-graph retrieval, on fresh examples of the store in its index; "
        "retrieval: recall@1/5/10; captioning: BLEU-4)",
    )
    evaluate.add_argument("--model", default="runs/vqa", help="run folder written by `kvlm train`")
    evaluate.add_argument("--data-dir", default=None, help="evaluate on this folder instead")
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    evaluate.set_defaults(handler=run_evaluate)


def run_train(args) -> int:
    if args.task != "vqa" and args.strategy not in ("auto", "one_device"):
        # Before Keras loads: the message names the problem, not a missing TF_CONFIG or GPU.
        raise ValueError(
            f"Strategy {args.strategy!r} is supported for the vqa task only; the {args.task} task trains on one "
            "device. Use --strategy auto or one_device (or --task vqa)."
        )
    if args.task == "distillation":
        given = [f"--{name.replace('_', '-')}" for name in TEACHER_DATA_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(
                f"The distillation task trains on its teacher run's data and sizes: drop {', '.join(given)}."
            )
    if args.task == "rag":
        given = [f"--{name.replace('_', '-')}" for name in RAG_REFUSED_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(
                "The rag task trains on the product-catalogue task (kvlm.data.catalogue), not on other data: "
                f"drop {' and '.join(given)}."
            )
    if args.cpu_devices:
        # Before Keras (and so JAX) starts; TensorFlow is split below.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    import keras

    from kvlm.training import NonFiniteLossError, TrainConfig, fit, make_distribution
    from kvlm.training.distribution import configure_cpu_devices
    from kvlm.training.tasks import TASK_DEFAULTS, check_task, task_distribution

    if args.cpu_devices and keras.backend.backend() == "tensorflow":
        configure_cpu_devices(args.cpu_devices)
    sizes = {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in TASK_DEFAULTS[args.task].items()
    }
    overrides = {"moe": {"experts": args.moe_experts, "top_k": args.moe_top_k}} if args.moe_experts else {}
    preset = args.preset
    if args.task == "distillation":
        preset, overrides = args.student_preset, {**overrides, "num_fusion_layers": args.student_fusion_layers}
    config = TrainConfig(
        output=args.output or f"runs/{args.task}", preset=preset, encoder=args.encoder, data_dir=args.data_dir,
        augment=args.augment, seed=args.seed, overrides=overrides,
        datasets=args.datasets, task=args.task, loss=args.loss, teacher=args.teacher, alpha=args.alpha,
        temperature=args.temperature, top_k=args.top_k, train_catalogues=args.train_catalogues,
        retriever_epochs=args.retriever_epochs, index_store=args.index_store, **sizes,
    )
    if args.task == "vqa":
        distribution = make_distribution(args.strategy, expert_axis_size=args.expert_axis_size)
    else:
        check_task(config)
        distribution = task_distribution(args.task, args.strategy)
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
    if args.task != "vqa":
        _print_task_summary(summary, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return 0
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


def _print_task_summary(summary: dict, out: Path) -> None:
    """One line on a finished retrieval, captioning, distillation or rag run (and the distillation or rag figures)."""
    resumed = f" (resumed at step {summary['resumed_from_step']})" if summary["resumed_from_step"] else ""
    loss = summary["metrics"]["loss"]
    if summary["task"] == "retrieval":
        recall = summary["recall"]
        held_out = (
            f"held-out loss {loss:.4f}, recall@1 image->text {recall['image_to_text']['recall@1']:.4f}, "
            f"text->image {recall['text_to_image']['recall@1']:.4f}"
        )
    elif summary["task"] == "rag":
        held_out = f"held-out loss {loss:.4f}, accuracy {summary['metrics']['accuracy']:.4f} (unseen stores)"
    elif summary["task"] == "distillation":
        held_out = (
            f"held-out distillation loss {loss:.4f}, student accuracy {summary['metrics']['accuracy']:.4f}"
        )
    else:
        held_out = f"held-out token loss {loss:.4f} (`kvlm evaluate --model {out}` for BLEU-4)"
    print(
        f"trained {summary['task']} on {summary['train_examples']} examples in {summary['train_seconds']:.0f}s"
        f"{resumed}; {held_out} on {summary['eval_examples']} examples; saved to {out / 'model.keras'}; "
        f"curves in {out / 'training_curves.png'}"
    )
    if summary["task"] == "distillation":
        from kvlm.training.distillation import DISTILLATION_FILE, format_distillation

        print(format_distillation(summary["distillation"]))
        print(f"distillation: {out / DISTILLATION_FILE}")
    if summary["task"] == "rag":
        from kvlm.training.rag import INDEX_DIR, RAG_FILE, format_rag

        print(format_rag(summary["rag"]))
        print(f"rag: {out / RAG_FILE}, index {out / INDEX_DIR}")


def run_evaluate(args) -> int:
    from kvlm.training import evaluate, format_report

    report = evaluate(args.model, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    elif "task" in report:
        from kvlm.training.tasks import format_task_report

        print(format_task_report(report))
    else:
        if report.get("index_store") is not None:
            print(f"in-graph retrieval from the catalogue of store {report['index_store']} in the model's index")
        print(format_report(report))
    return 0
