"""`kvlm export`: a trained run folder -> `saved_models/<name>/<version>/` for TF Serving."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Adds the `export` command."""
    parser = subparsers.add_parser(
        "export",
        help="export a trained run as a TF Serving SavedModel (raw image bytes + text in; answer, embeddings "
        "or caption out, by task)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="runs/vqa", help="run folder written by `kvlm train`")
    parser.add_argument("--base-path", default="saved_models", help="TF Serving model base path")
    parser.add_argument("--name", default="kvlm", help="model name (a folder under --base-path)")
    parser.add_argument("--version", type=int, default=None, help="version number (default: next integer)")
    parser.add_argument(
        "--platforms", default=None,
        help="JAX backend only: comma-separated devices to lower the model for, e.g. cpu,cuda",
    )
    parser.set_defaults(handler=run_export)


def run_export(args) -> int:
    import json

    from kvlm.export import export_model
    from kvlm.export.savedmodel import METADATA_FILE
    from kvlm.export.warmup import WARMUP_DIR
    from kvlm.runs import read_task
    from kvlm.tasks import get_task

    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip()) if args.platforms else None
    path = export_model(args.model, base_path=args.base_path, name=args.name, version=args.version, platforms=platforms)
    task = read_task(args.model)
    description = get_task(task).export_description
    metadata = json.loads((path / WARMUP_DIR / METADATA_FILE).read_text())
    if "experts" in metadata:  # a model with experts installed: the outputs and signature they add
        chosen = metadata["choose_experts"]
        description = (f"signature {metadata['signature']}: {', '.join(metadata['inputs'])} -> "
                       f"{', '.join(metadata['outputs'])}; {chosen['signature']} also takes {chosen['input']} "
                       f"(experts: {', '.join(metadata['experts'])})")
    print(f"exported {task} run {args.model} to {path} ({description})")
    return 0
