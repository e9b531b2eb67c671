"""`kvlm train` and `kvlm evaluate`; the tasks, their help, defaults and options come from `kvlm.tasks`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvlm.tasks import task_info, task_names
from kvlm.tasks.info import DEFAULT_FIELDS, positive_int

PRESETS = ("kvlm_tiny", "kvlm_small", "kvlm_base")


def _infos():
    """The registered tasks' `TaskInfo`s, read when a parser is built (the registry may grow after import)."""
    return [task_info(name) for name in task_names()]


def strategy_choices() -> tuple[str, ...]:
    """Every strategy some registered task trains under, in registry order."""
    return tuple(dict.fromkeys(s for info in _infos() for s in info.strategies))


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


def _per_task(field: str) -> str:
    """`vqa 36000, retrieval 4096, ...; distillation: not set` for a default field."""
    infos = _infos()
    values = [f"{info.name} {info.defaults[field]}" for info in infos if field in info.defaults]
    missing = [info.name for info in infos if field not in info.defaults]
    return ", ".join(values) + (f"; {', '.join(missing)}: from its teacher run" if missing else "")


def _add_task_options(train: argparse.ArgumentParser) -> None:
    """The flags of every task's options (default None: an option of another task is refused)."""
    for info in _infos():
        for option in info.options:
            if option.cli:
                default = f" (default: {option.default})" if option.default is not None else ""
                train.add_argument(
                    option.flag, dest=option.name, type=option.type, choices=option.choices, default=None,
                    help=f"{info.name}: {option.help}{default} [per task]",
                )


def register(subparsers) -> None:
    """Adds the `train` and `evaluate` commands."""
    infos = _infos()
    tasks = "|".join(task_names())
    train = subparsers.add_parser(
        "train",
        help=f"train a model for a task (--task {tasks}; procedural data or a folder with annotations.jsonl)",
        formatter_class=_HelpFormatter,
    )
    train.add_argument("--task", default=task_names()[0], choices=task_names(),
                       help="; ".join(f"{info.name}: {info.help}" for info in infos))
    _add_task_options(train)
    train.add_argument("--output", default=None, help="run folder for model, vocabulary and logs (default per task: runs/TASK)")
    train.add_argument("--preset", default="kvlm_tiny", choices=PRESETS,
                       help="model preset (distillation: see --student-preset)")
    train.add_argument("--encoder", default="cnn", choices=["vit", "cnn"], help="image encoder (distillation: the student's)")
    train.add_argument("--image-encoder", default=None, metavar="PRESET",
                       help="vqa: a keras-hub vision preset (Kaggle or Hugging Face handle, or a local folder) as the "
                       "image encoder, with its pretrained weights, in place of --encoder")
    train.add_argument("--data-dir", default=None, help="folder with images and annotations.jsonl")
    train.add_argument(
        "--datasets", type=_dataset_names, default=None,
        help="comma-separated plugin datasets to mix in equal shares, e.g. "
        "medical_scans,legal_documents,retail_shelves (see `kvlm experts list`)",
    )
    train.add_argument("--train-size", type=int, default=None,
                       help=f"procedural training examples (default per task: {_per_task('train_size')})")
    train.add_argument("--eval-size", type=int, default=None,
                       help=f"procedural held-out examples (default per task: {_per_task('eval_size')})")
    train.add_argument("--epochs", type=int, default=None, help=f"training epochs (default per task: {_per_task('epochs')})")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"global batch, split over replicas (default per task: {_per_task('batch_size')})")
    train.add_argument("--learning-rate", type=float, default=None,
                       help=f"peak AdamW learning rate (default per task: {_per_task('learning_rate')})")
    train.add_argument("--augment", action="store_true", help="tf-models-official RandAugment")
    train.add_argument("--seed", type=int, default=0)
    one_device = [info.name for info in infos if "mirrored" not in info.strategies]
    train.add_argument(
        "--strategy", default="auto", choices=strategy_choices(),
        help="tensorflow: one_device|mirrored|multi_worker (cluster from TF_CONFIG); "
        "jax: data_parallel|expert_parallel (processes from KERAS_DISTRIBUTION_*); auto picks from the environment. "
        f"The {', '.join(one_device)} tasks train on one device: auto or one_device",
    )
    train.add_argument("--moe-experts", type=_moe_experts, default=None,
                       help="put a SparseMoE in every other fusion block (captioning: after every decoder layer; "
                       "not for retrieval or the distillation student): N built-in FFN experts, "
                       "'installed' (every plugin expert) or comma-separated expert names (`kvlm experts list`)")
    train.add_argument("--moe-top-k", type=int, default=2, help="experts per token (with --moe-experts)")
    train.add_argument("--expert-axis-size", type=positive_int, default=None,
                       help="expert_parallel: devices on the expert axis")
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


def train_config_fields(args) -> dict:
    """The `TrainConfig` fields of parsed `kvlm train` arguments.

    Raises:
        ValueError: An option of another task is given, or a field the task refuses.
    """
    info = task_info(args.task)
    own = {option.name for option in info.options}
    foreign = [
        option.flag for other in _infos() if other is not info for option in other.options
        if option.cli and option.name not in own and getattr(args, option.name) is not None
    ]
    if foreign:
        raise ValueError(f"{' and '.join(dict.fromkeys(foreign))}: not an option of the {args.task} task.")
    fields = {name: getattr(args, name) for name in DEFAULT_FIELDS}
    fields |= dict(
        task=args.task, output=args.output or f"runs/{args.task}", preset=args.preset, encoder=args.encoder,
        data_dir=args.data_dir, datasets=args.datasets, augment=args.augment, seed=args.seed,
        overrides={"moe": {"experts": args.moe_experts, "top_k": args.moe_top_k}} if args.moe_experts else {},
        task_options={},
    )
    if args.image_encoder:
        fields["overrides"]["image_encoder"] = args.image_encoder
    info.check_refused(fields)
    for option in info.options:
        value = getattr(args, option.name, None)
        value = option.default if value is None else value
        if option.config_field is None:
            if option.cli:
                fields["task_options"][option.name] = value
        elif option.config_field.startswith("overrides."):
            fields["overrides"][option.config_field.removeprefix("overrides.")] = value
        else:
            fields[option.config_field] = value
    return fields


def run_train(args) -> int:
    # Before Keras loads: the messages name the problem, not a missing TF_CONFIG or GPU.
    info = task_info(args.task)
    fields = train_config_fields(args)
    if args.strategy not in info.strategies:
        from kvlm.training.loop import strategy_error

        raise ValueError(strategy_error(info, args.strategy))
    if args.cpu_devices:
        # Before Keras (and so JAX) starts; TensorFlow is split below.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    import keras

    from kvlm.runs import SUMMARY_FILE, TrainConfig
    from kvlm.tasks import get_task
    from kvlm.training.callbacks import NonFiniteLossError
    from kvlm.training.distribution import configure_cpu_devices
    from kvlm.training.loop import fit, resolve_distribution

    if args.cpu_devices and keras.backend.backend() == "tensorflow":
        configure_cpu_devices(args.cpu_devices)
    strategy = args.strategy
    if args.expert_axis_size:
        strategy = resolve_distribution(info, strategy, expert_axis_size=args.expert_axis_size)
    try:
        summary = fit(
            TrainConfig(**fields), strategy=strategy, checkpoint=True, backup_freq=args.backup_freq,
            tensorboard=args.tensorboard,
        )
    except NonFiniteLossError as error:
        print(f"kvlm train: {error}", file=sys.stderr)
        return 1
    print("\n".join(get_task(args.task).summary_lines(summary)))
    (Path(summary["output"]) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return 0


def run_evaluate(args) -> int:
    from kvlm.runs import read_task
    from kvlm.tasks import get_task
    from kvlm.training.evaluation import evaluate

    report = evaluate(args.model, data_dir=args.data_dir)
    print(json.dumps(report, indent=2) if args.json else get_task(read_task(args.model)).format_report(report))
    return 0
