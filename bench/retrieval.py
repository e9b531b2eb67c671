"""Image <-> text retrieval of the tiny DualEncoder on procedural shapes pairs (TensorFlow, CPU).

Trains `DualEncoder.from_preset("kvlm_tiny", encoder="cnn")` once with each loss
(CLIP, SigLIP) on image-caption pairs from `kvlm.data.shapes` and reports recall@1/5/10
in both directions on a held-out split (new renders from another seed), next to the
recall of a random ranking.

Positives: a retrieved item is correct when its caption is identical to the query's
caption (captions repeat in the shapes dataset); training uses the same rule (pair
ids are caption ids). Chance levels account for these repeats.

Run: `python bench/retrieval.py` (writes bench/results/retrieval.json and retrieval.md).
"""

from __future__ import annotations

import json
import time

import common

common.use_tensorflow(__file__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from kvlm.data import build_vocabulary, make_pair_dataset, make_tokenizer, shapes  # noqa: E402
from kvlm.models import DualEncoder  # noqa: E402
from kvlm.models.retrieval import DEFAULT_KS, chance_recall_at_k, embed_pairs, recall_at_k  # noqa: E402


def parse_args(argv=None):
    parser = common.training_parser(__doc__, train_size=4096, held_out_size=512, epochs=10, batch_size=64,
                                    learning_rate=1e-3, encoder="cnn", seed=0, output=str(common.RESULTS))
    parser.add_argument("--losses", default="clip,siglip")
    return parser.parse_args(argv)


def run_one(loss, args, train, held_out, tokenizer, vocabulary_size):
    keras.utils.set_random_seed(args.seed)
    model = DualEncoder.from_preset("kvlm_tiny", vocabulary_size=vocabulary_size, encoder=args.encoder, loss=loss)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    train_data = make_pair_dataset(train, tokenizer, model.image_size, args.batch_size, shuffle=True, seed=args.seed)
    held_out_data = make_pair_dataset(held_out, tokenizer, model.image_size, batch_size=256)
    start = time.perf_counter()
    history = model.fit(train_data, epochs=args.epochs, verbose=0)
    train_seconds = time.perf_counter() - start
    images, texts = embed_pairs(model, held_out_data)
    captions = [e.caption for e in held_out]
    bias = model.logit_head.logit_bias
    return {
        "loss": loss,
        "parameters": model.count_params(),
        "train_seconds": round(train_seconds, 1),
        "train_loss_per_epoch": [round(float(v), 4) for v in history.history["loss"]],
        "held_out_loss": round(float(model.evaluate(held_out_data, verbose=0)), 4),
        "temperature": round(model.temperature, 4),
        "bias": None if bias is None else round(float(keras.ops.convert_to_numpy(bias)), 3),
        "recall": recall_at_k(images, texts, DEFAULT_KS, captions=captions),
        # The same check with only the paired caption counted as correct.
        "recall_paired_only": recall_at_k(images, texts, DEFAULT_KS, captions=None),
    }


def markdown(result) -> str:
    ks = result["ks"]
    chance = result["chance"]
    lines = [
        "# Retrieval: tiny DualEncoder on procedural shapes pairs (TensorFlow, CPU)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"kvlm_tiny, {result['config']['encoder']} image encoder, embedding_dim 64; "
        f"{result['config']['train_size']} training pairs (seed {result['data']['train_seed']}), "
        f"{result['config']['epochs']} epochs, batch {result['config']['batch_size']}, "
        f"Adam {result['config']['learning_rate']}. Held-out: {result['config']['held_out_size']} pairs "
        f"(seed {result['data']['held_out_seed']}) with {result['data']['held_out_distinct_captions']} "
        f"distinct captions; {result['data']['held_out_captions_seen_in_training']:.0%} of held-out pairs "
        "have a caption that also occurs in training (the images are new renders).",
        "",
        "A retrieved item is correct when its caption is identical to the query's; chance is the",
        "expected recall of a random ranking given those repeats.",
        "",
        "| loss | direction | " + " | ".join(f"R@{k}" for k in ks) + " | train (s) | temperature | bias |",
        "|---|---|" + "---:|" * len(ks) + "---:|---:|---:|",
    ]
    for run in result["runs"]:
        for direction in ("image_to_text", "text_to_image"):
            values = " | ".join(f"{run['recall'][direction][f'recall@{k}']:.3f}" for k in ks)
            bias = "" if run["bias"] is None else f"{run['bias']:.2f}"
            lines.append(
                f"| {run['loss']} | {direction.replace('_', ' ')} | {values} | {run['train_seconds']:.0f} | "
                f"{run['temperature']:.4f} | {bias} |"
            )
    lines.append("| chance | either | " + " | ".join(f"{chance[f'recall@{k}']:.3f}" for k in ks) + " | | | |")
    lines += [
        "",
        "Counting only the paired item as correct (`captions=None`; chance R@k = k / n):",
        "",
        "| loss | direction | " + " | ".join(f"R@{k}" for k in ks) + " |",
        "|---|---|" + "---:|" * len(ks),
    ]
    for run in result["runs"]:
        for direction in ("image_to_text", "text_to_image"):
            values = " | ".join(f"{run['recall_paired_only'][direction][f'recall@{k}']:.3f}" for k in ks)
            lines.append(f"| {run['loss']} | {direction.replace('_', ' ')} | {values} |")
    lines += [
        "",
        "Training loss per epoch: "
        + "; ".join(f"{run['loss']}: {run['train_loss_per_epoch']}" for run in result["runs"]),
        "",
        f"Machine: {result['machine']}. Wall time of the whole run: {result['total_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    total_start = time.perf_counter()
    train_seed, held_out_seed = args.seed, args.seed + 1000
    train = shapes.generate(args.train_size, seed=train_seed)
    held_out = shapes.generate(args.held_out_size, seed=held_out_seed)
    vocabulary = build_vocabulary([e.caption for e in train], 200)
    tokenizer = make_tokenizer(vocabulary, 16)
    captions = [e.caption for e in held_out]
    train_captions = {e.caption for e in train}
    runs = []
    for loss in args.losses.split(","):
        run = run_one(loss.strip(), args, train, held_out, tokenizer, len(vocabulary))
        print(json.dumps({k: run[k] for k in ("loss", "train_seconds", "recall")}), flush=True)
        runs.append(run)
    body = {
        "data": {
            "train_seed": train_seed,
            "held_out_seed": held_out_seed,
            "held_out_distinct_captions": len(set(captions)),
            "held_out_captions_seen_in_training": float(np.mean([c in train_captions for c in captions])),
        },
        "ks": list(DEFAULT_KS),
        "chance": chance_recall_at_k(captions, DEFAULT_KS),
        "chance_paired_only": chance_recall_at_k(len(captions), DEFAULT_KS),
        "runs": runs,
    }
    result = common.record(__file__, args, argv, body, total_start)
    path = common.write_results(args.output, "retrieval", result, markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
