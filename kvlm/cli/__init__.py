"""The `kvlm` command line: one module per command group."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvlm.cli.device_probe import probe_devices

# Modules under kvlm.cli that each define `register(subparsers)`.
COMMAND_GROUPS = (
    "train",
    "data",
    "experts",
    "export",
    "index",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="kvlm",
        description="Keras 3 vision-language models with plugin-provided sparse Mixture-of-Experts.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        importlib.import_module(f"kvlm.cli.{group}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    # Commands that load TensorFlow list its devices first (see device_probe); the others set
    # `uses_tensorflow=False` in their parser's defaults.
    if getattr(args, "uses_tensorflow", True):
        probe_devices()
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"kvlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
