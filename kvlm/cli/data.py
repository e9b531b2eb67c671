"""`kvlm data`: writes a procedural dataset as a folder of images plus `annotations.jsonl`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Adds the `data` command."""
    parser = subparsers.add_parser(
        "data",
        help="write the procedural shapes set (or an installed plugin's dataset) as images + annotations.jsonl",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="folder to write (images/ and annotations.jsonl)")
    parser.add_argument("--dataset", default="shapes", help="'shapes' or a dataset from `kvlm experts list`")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="plugin datasets' split")
    parser.add_argument("--size", type=int, default=100, help="number of examples")
    parser.add_argument("--seed", type=int, default=10_000, help="generator seed")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.set_defaults(handler=run_data, uses_tensorflow=False)


def run_data(args) -> int:
    from kvlm.data import shapes, write_folder

    if args.dataset == "shapes":
        examples = shapes.generate(args.size, seed=args.seed, image_size=args.image_size)
    else:
        from kvlm.experts import datasets

        found = datasets()
        if args.dataset not in found:
            raise ValueError(f"Unknown dataset {args.dataset!r}; available: shapes, {', '.join(sorted(found))}")
        examples = found[args.dataset].spec.load(args.split, args.size, args.seed, image_size=args.image_size)
    path = write_folder(examples, args.output)
    print(f"wrote {len(examples)} examples to {path}")
    return 0
