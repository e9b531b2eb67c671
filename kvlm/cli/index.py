"""`kvlm index build|query|attach`: a knowledge base embedded by a dual encoder, put into a rag model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    """Adds the `index` command group."""
    parser = subparsers.add_parser(
        "index",
        help="retrieval augmentation: build a knowledge-base index with a dual encoder, query it, "
        "attach it to a rag run",
    )
    commands = parser.add_subparsers(dest="index_command", metavar="SUBCOMMAND", required=True)

    build = commands.add_parser(
        "build",
        help="embed knowledge-base entries with a retrieval run's dual encoder (or a rag run's retriever)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("--model", default="runs/retrieval",
                       help="run folder of `kvlm train --task retrieval` or `--task rag` (its retriever)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--entries",
        help="entries file: .txt (one entry per line) or .jsonl with 'text' and optionally 'key' "
        "(a text to embed instead) or 'image' (an image file to embed instead, relative to the file)",
    )
    source.add_argument("--catalogue", type=int, help="the product catalogue of this store seed (kvlm.data.catalogue)")
    build.add_argument("--output", required=True, help="index folder to write")
    build.set_defaults(handler=run_build)

    query = commands.add_parser(
        "query",
        help="print the entries nearest to an image and/or a text",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    query.add_argument("--index", required=True, help="index folder written by `kvlm index build`")
    query.add_argument("--model", default=None, help="dual encoder run folder (default: the one that built the index)")
    query.add_argument("--text", default=None, help="query text")
    query.add_argument("--image", default=None, help="query image file (PNG/JPEG)")
    query.add_argument("-k", "--top-k", type=int, default=5, help="entries to print")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.set_defaults(handler=run_query)

    attach = commands.add_parser(
        "attach",
        help="copy a rag run with another index in its model (e.g. another store's catalogue), without retraining",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    attach.add_argument("--model", required=True, help="run folder of `kvlm train --task rag`")
    attach.add_argument("--index", required=True, help="index folder built with that run (`kvlm index build --model RUN`)")
    attach.add_argument("--output", required=True, help="new run folder (must not exist or be empty)")
    attach.set_defaults(handler=run_attach)


def read_entries(path: str | Path) -> list[dict]:
    """Entries of a `.txt` (one per line) or `.jsonl` file as dicts with `text` (and `key` or `image`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No entries file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        entries = [{"text": line.strip()} for line in lines if line.strip()]
    else:
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or not entry["text"].strip():
                raise ValueError(f"{path}:{number}: each line needs a non-empty string 'text'")
            if "key" in entry and "image" in entry:
                raise ValueError(f"{path}:{number}: give 'key' or 'image', not both")
            if "image" in entry:
                entry["image"] = str(path.parent / entry["image"])
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path} holds no entries.")
    return entries


def _load_dual_encoder(run_dir):
    """The dual encoder of a run (a retrieval run's model, a rag run's retriever) and the run's tokenizer."""
    from kvlm.runs import load_run
    from kvlm.tasks import get_task

    run = load_run(run_dir)
    return get_task(run.config.task).dual_encoder(run), run.tokenizer


def _read_images(paths, image_size: int):
    import numpy as np
    import tensorflow as tf

    from kvlm.data import decode_image, resize_image

    images = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"No image file at {path}")
        try:
            image = decode_image(tf.io.read_file(str(path)))
        except tf.errors.InvalidArgumentError:
            raise ValueError(f"{path} is not a PNG, JPEG, GIF or BMP image.") from None
        images.append(resize_image(image, image_size).numpy())
    return np.stack(images)


def run_build(args) -> int:
    from kvlm.models import build_index
    from kvlm.tasks.rag.task import retriever_fingerprint

    model, tokenizer = _load_dual_encoder(args.model)
    if args.catalogue is not None:
        from kvlm.data import catalogue

        texts, keys, images = catalogue.catalogue(args.catalogue), catalogue.keys(), None
    else:
        entries = read_entries(args.entries)
        with_image = [e for e in entries if "image" in e]
        if with_image and len(with_image) != len(entries):
            raise ValueError("Either every entry has an 'image' key or none does: one index embeds one kind of key.")
        texts = [e["text"] for e in entries]
        keys = None if with_image else [e.get("key", e["text"]) for e in entries]
        images = _read_images([e["image"] for e in entries], model.image_size) if with_image else None
    index = build_index(model, tokenizer, texts, keys=keys, key_images=images)
    index.metadata = {"model": str(Path(args.model).resolve()), "embedding": "image" if images is not None else "text"}
    if args.catalogue is not None:
        index.metadata["catalogue"] = args.catalogue
    # `kvlm index attach` checks that a rag run's retriever embedded the index.
    index.metadata["retriever"] = retriever_fingerprint(model)
    path = index.save(args.output)
    print(f"indexed {len(index)} entries ({index.embedding_dim}-d {index.metadata['embedding']} keys) in {path}")
    return 0


def run_query(args) -> int:
    from kvlm.models import KnowledgeIndex, query_embeddings

    if args.text is None and args.image is None:
        raise ValueError("Give a query: --text, --image or both.")
    index = KnowledgeIndex.load(args.index)
    run_dir = args.model or index.metadata.get("model")
    if run_dir is None:
        raise ValueError(f"{args.index} does not say which model built it: pass --model.")
    model, tokenizer = _load_dual_encoder(run_dir)
    images = _read_images([args.image], model.image_size) if args.image is not None else None
    texts = [args.text] if args.text is not None else None
    query = query_embeddings(model, tokenizer, images=images, texts=texts)
    scores, ids = index.search(query, min(args.top_k, len(index)))
    results = [
        {"rank": rank, "score": round(float(s), 4), "entry": int(i), "text": index.texts[i], "key": index.keys[i]}
        for rank, (s, i) in enumerate(zip(scores[0], ids[0]), start=1)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['rank']:>3}  {r['score']:+.4f}  {r['text']}")
    return 0


def run_attach(args) -> int:
    from kvlm.tasks.rag.task import attach_index

    result = attach_index(args.model, args.index, args.output)
    source = f"the catalogue of store {result['index_store']}" if result["index_store"] is not None else "its entries"
    print(
        f"attached {result['entries']} entries ({source}) from {args.index} to the model of {args.model}; "
        f"new run folder {result['output']} (`kvlm evaluate` / `kvlm export --model {result['output']}`)"
    )
    return 0
